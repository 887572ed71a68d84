"""How many fine-tuning steps a T5 needs before it copies a word from its input to its output.

Open-book QA (``world-qa-context``) asks the model to copy the answer out of the passage.  This probe isolates the
copying: every example is ``question: What is the word? context: The word is X.`` -> ``X``, with ``X`` a random word
of the world's passages, so nothing but copying can lower the loss.  It trains lmforge's T5 (or transformers'
``T5ForConditionalGeneration`` loaded from the same directory, ``--impl transformers``) with AdamW and prints the
loss and the accuracy on the first answer token every ``--every`` steps: a long plateau at the word prior, then a
jump, is the copying skill being learned in fine-tuning rather than brought from pretraining.

    python benchmarks/probe_copy.py --model runs/tiny-t5/model --steps 2000
    python benchmarks/probe_copy.py --model runs/tiny-t5/model --impl transformers --steps 400
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lmforge.objectives.seq2seq import Seq2SeqObjective  # noqa: E402
from lmforge.data.world.tasks import build_world_task  # noqa: E402
from lmforge.models.io import load_model  # noqa: E402


def words_of_world(n_passages: int = 4000) -> list[str]:
    """Distinct alphabetic words of the open-book QA passages (names, trades, colours, plain words)."""
    recs = build_world_task("world-qa-context", n_train=n_passages, n_val=0, n_test=0)["train"]
    return sorted({w.strip(".,") for r in recs for w in r["input"].split(" context: ")[1].split()
                   if w.strip(".,").isalpha()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a T5 model dir (lmforge's or transformers')")
    ap.add_argument("--impl", choices=["lmforge", "transformers"], default="lmforge")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--optim", choices=["adamw", "adafactor"], default="adamw",
                    help="adafactor: torch.optim.Adafactor, whose steps scale with each parameter's RMS (T5's optimizer)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    if args.impl == "transformers":
        from transformers import T5ForConditionalGeneration

        model = T5ForConditionalGeneration.from_pretrained(args.model)
    model.train()
    words, rng = words_of_world(), random.Random(args.seed)
    objective = Seq2SeqObjective(pad_id=tok.pad_id if tok.pad_id is not None else 0)

    def example() -> tuple[list[int], list[int]]:
        x = rng.choice(words)
        return (list(tok.encode(f"question: What is the word? context: The word is {x}.")) + [tok.eos_id],
                list(tok.encode(tok.word_prefix + x)) + [tok.eos_id])

    if args.optim == "adafactor":
        opt: torch.optim.Optimizer = torch.optim.Adafactor(model.parameters(), lr=args.lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    print(f"# {machine()} | {args.model} ({args.impl}) | {len(words)} words | {type(opt).__name__} lr {args.lr}, "
          f"batch {args.batch}")
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = objective.collate([example() for _ in range(args.batch)])
        if args.impl == "transformers":
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            loss, logits = out.loss, out.logits
        else:
            dec_in = model.shift_right(batch["labels"])
            hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec_in)
            logits = model.lm_head(hidden)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.every == 0 or step == args.steps:
            first = (logits[:, 0].argmax(-1) == batch["labels"][:, 0]).float().mean().item()
            print(f"step {step} | loss {loss.item():.3f} | first answer token accuracy {first:.3f} | "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
