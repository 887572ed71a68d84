"""SFT training speed: lmforge's Trainer with the SFT objective vs TRL's ``SFTTrainer``, one process.

Same model (a random GPT-2 built here, ChatML added, the same weights loaded by both), same conversations (the
built-in world's closed-book QA as one-turn chats, plus a second turn on every third so lengths vary), same
supervised tokens (lmforge's assistant masks handed to TRL as ``assistant_masks``), same batch size, AdamW, fp32.
Both sides pad (TRL's correct CPU setting: its padding-free packing needs flash attention); lmforge packed is
printed beside it.  Tokens/s counts real (non-pad) input tokens over the steady steps: the time between the
collator call of step ``warmup`` and that of the last step (TRL: between step ends), best of ``--rounds`` alternating
rounds.  Prints each side's padding fraction; the last line is JSON with ``ratio`` = lmforge padded / TRL padded.
Each rate is also given per CPU second of the process (``cpu_ratio``): with one torch thread on a machine other jobs
share, CPU time moves far less than wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from lmforge.core.tokenizer import Tokenizer  # noqa: E402
from lmforge.data.chat_data import Conversation  # noqa: E402
from lmforge.data.examples import ExampleSource  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.io import load_model, save_model  # noqa: E402
from lmforge.objectives.sft import SFTObjective  # noqa: E402
from lmforge.recipes.sft import ChatConfig, SFTDataConfig, chat_format, world_conversations  # noqa: E402
from lmforge.train.run import RunSpec  # noqa: E402
from lmforge.train.trainer import Trainer, TrainerConfig  # noqa: E402


class Clock:
    """Wraps a collator: counts real and padded tokens and stamps each call (one per training step)."""

    def __init__(self, collate, warmup: int) -> None:
        self.collate, self.warmup = collate, warmup
        self.stamps: list[float] = []
        self.cpu: list[float] = []  # process CPU time at the same instants: steadier than wall time under load
        self.real: list[int] = []
        self.cells: list[int] = []

    def __call__(self, raw):
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())
        batch = self.collate(raw)
        self.real.append(int(batch["attention_mask"].sum()))
        self.cells.append(int(batch["input_ids"].numel()))
        return batch

    def result(self, step_ends: list[tuple[float, float]] | None = None) -> dict[str, float]:
        """Steps ``warmup`` .. the last timed: lmforge's between two collator stamps (each taken as a step starts);
        TRL's between the ends of two steps (``step_ends``: its dataloader fetches a batch ahead, so the collator's
        stamps do not mark its steps)."""
        w = self.warmup
        if step_ends is None:
            last = len(self.stamps) - 1  # steps w .. last-1 lie between the stamps of steps w and last
            seconds = self.stamps[last] - self.stamps[w]
            cpu = self.cpu[last] - self.cpu[w]
        else:
            last = len(step_ends)  # steps w .. last-1 lie between the ends of steps w-1 and last-1
            seconds = step_ends[last - 1][0] - step_ends[w - 1][0]
            cpu = step_ends[last - 1][1] - step_ends[w - 1][1]
        tokens = sum(self.real[w:last])
        return {"tokens_per_s": tokens / seconds, "cpu_tokens_per_s": tokens / cpu,
                "padding": 1 - sum(self.real) / sum(self.cells), "steps_timed": last - w, "seconds": seconds}


def build(args, root: Path):
    texts = [f"What is {i} plus one? It is {i + 1}. Who lives in the city by the river?" for i in range(200)]
    tok = Tokenizer.train(texts, vocab_size=512)
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(family="gpt2", vocab_size=tok.vocab_size, d_model=args.d_model,
                                    n_layer=args.layers, n_head=args.heads, max_seq_len=256, dropout=0.0,
                                    eos_token_id=tok.eos_id, bos_token_id=tok.bos_id))
    chat_format(ChatConfig(), model, tok)  # ChatML's tokens, rows and template
    save_model(model, root / "model", tokenizer=tok)
    convs = world_conversations("world-qa-closed", SFTDataConfig(n_train=args.conversations, n_val=1))["train"]
    for i, c in enumerate(convs):
        if i % 3 == 0:
            c.messages += [{"role": "user", "content": "Say it again, in a full sentence please."},
                           {"role": "assistant", "content": "The answer is " + c.messages[1]["content"] + "."}]
            c.weights += [1, 1]
    return convs


def run_lmforge(args, root: Path, convs: list[Conversation], packing: bool, tag: int = 0) -> dict[str, float]:
    model, tok = load_model(root / "model")
    fmt, _ = chat_format(ChatConfig(), model, tok)
    obj = SFTObjective(fmt, max_length=256, pad_id=tok.pad_id, packing=packing)
    examples = [e for e in (obj.encode(c) for c in convs) if e is not None]
    clock = Clock(obj.collate, args.warmup)
    cfg = TrainerConfig(global_batch_size=args.batch, lr=1e-4, warmup_steps=0, weight_decay=0.0, schedule="constant",
                        eval_every=0, ckpt_every=10**6, log_every=10**6, device="cpu", precision="fp32")
    run = RunSpec(root / f"lmforge-{'packed' if packing else 'padded'}-{tag}", args.steps, seed=0, resume="false")
    model.train()
    Trainer(model, obj, ExampleSource(examples, clock, seed=0), cfg, run, progress=False).fit()
    return clock.result()


def run_trl(args, root: Path, convs: list[Conversation], tag: int = 0) -> dict[str, float]:
    import datasets
    import transformers
    import trl
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, tok = load_model(root / "model")
    fmt, _ = chat_format(ChatConfig(), model, tok)
    obj = SFTObjective(fmt, max_length=256, pad_id=tok.pad_id)
    rows = [{"input_ids": ids, "assistant_masks": mask}
            for ids, mask in (e for e in (obj.encode(c) for c in convs) if e is not None)]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "model"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(root / "model"))
    clock = Clock(DataCollatorForLanguageModeling(pad_token_id=tok.pad_id), args.warmup)
    cfg = trl.SFTConfig(output_dir=str(root / f"trl-{tag}"), per_device_train_batch_size=args.batch, max_steps=args.steps,
                        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                        max_length=None, packing=False, report_to="none", use_cpu=True, dataloader_num_workers=0,
                        logging_steps=10**6, save_strategy="no", seed=0, disable_tqdm=True)
    ends: list[tuple[float, float]] = []

    class StepEnds(transformers.TrainerCallback):
        def on_step_end(self, *_a, **_k):
            ends.append((time.perf_counter(), time.process_time()))

    trainer = trl.SFTTrainer(model=hf_model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=hf_tok, data_collator=clock, callbacks=[StepEnds()])
    trainer.train()
    return clock.result(ends)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--conversations", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; each side keeps its best")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks the script runs")
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.layers, args.conversations, args.batch, args.steps, args.warmup = 64, 2, 64, 8, 6, 2
        args.rounds = 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        convs = build(args, root)
        best: dict[str, dict[str, float]] = {}
        for r in range(args.rounds):  # A, B, C, A, B, C, ...: load drift hits every side alike; each keeps its best
            for name, fn in (("ours", lambda: run_lmforge(args, root, convs, packing=False, tag=r)),
                             ("ref", lambda: run_trl(args, root, convs, tag=r)),
                             ("packed", lambda: run_lmforge(args, root, convs, packing=True, tag=r))):
                got = fn()
                if name not in best or got["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = {**got, "cpu_tokens_per_s": max(got["cpu_tokens_per_s"],
                                                                 best.get(name, got)["cpu_tokens_per_s"])}
                else:
                    best[name]["cpu_tokens_per_s"] = max(got["cpu_tokens_per_s"], best[name]["cpu_tokens_per_s"])
        ours, ref, packed = best["ours"], best["ref"], best["packed"]
    out = {"machine": machine(), "ratio": ours["tokens_per_s"] / ref["tokens_per_s"],
           "packed_vs_trl_padded": packed["tokens_per_s"] / ref["tokens_per_s"],
           "cpu_ratio": ours["cpu_tokens_per_s"] / ref["cpu_tokens_per_s"],
           "cpu_packed_vs_trl_padded": packed["cpu_tokens_per_s"] / ref["cpu_tokens_per_s"],
           "lmforge_padded": ours, "trl_padded": ref, "lmforge_packed": packed,
           "shape": {"d_model": args.d_model, "layers": args.layers, "batch": args.batch, "steps": args.steps,
                     "conversations": args.conversations, "threads": args.threads, "rounds": args.rounds}}
    for name, r in (("lmforge padded", ours), ("TRL SFTTrainer padded", ref), ("lmforge packed", packed)):
        print(f"{name:>22}: {r['tokens_per_s']:10.0f} tokens/s  ({r['cpu_tokens_per_s']:.0f} per CPU second)  "
              f"padding {r['padding']:.1%}  ({r['steps_timed']} steps timed)")
    print(f"lmforge / TRL (both padded): {out['ratio']:.2f}x   lmforge packed / TRL padded: "
          f"{out['packed_vs_trl_padded']:.2f}x   (by CPU time: {out['cpu_ratio']:.2f}x, "
          f"{out['cpu_packed_vs_trl_padded']:.2f}x)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
