"""DPO training step: lmforge's DPO objective vs TRL's ``DPOTrainer`` loss, one process, same model and pairs.

Same random GPT-2 (ChatML added; the same weights loaded by both: lmforge's model and transformers'
``GPT2LMHeadModel`` from the saved dir), the same world preference pairs rendered once by lmforge's chat format and
handed to both as token ids (TRL's ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` layout, TRL's collator on its
side), β = 0.1, sigmoid loss, fp32, dropout 0.  A step on either side is: the DPO loss of one batch of pairs (the
policy on chosen and rejected in one concatenated forward, the reference under no_grad), backward, AdamW.  TRL's
step is its own ``DPOTrainer._compute_loss`` (the code its ``train()`` runs per micro-batch), without the HF Trainer
loop around it; lmforge's is ``PreferenceObjective.loss``.  The first two steps' losses (ln 2, then after one
update) are checked equal before timing.

Two settings, as the issue asks: a full frozen copy as reference (TRL ``ref_model=``, lmforge ``FrozenReference``),
then LoRA r=8 on ``c_attn`` with the reference being the base with the adapter disabled (TRL: a PEFT model and
``ref_model=None``; lmforge: ``DisabledReference``).  Sides alternate over ``--rounds``; each keeps its best
median.  Prints each rate in pairs/s (wall and per CPU second of the process — steadier on a shared machine) and
the ratio; the last line is JSON.

    python benchmarks/bench_dpo.py            # batch 16 pairs, d_model 256, 4 layers
    python benchmarks/bench_dpo.py --quick    # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from lmforge.core.tokenizer import Tokenizer  # noqa: E402
from lmforge.delta import DeltaConfig, apply_delta, delta_disabled  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.io import load_model, save_model  # noqa: E402
from lmforge.objectives.preference import (DisabledReference, FrozenReference, PreferenceObjective,  # noqa: E402
                                           collate_pairs)
from lmforge.recipes.pairs import PairDataConfig, PairEncoder, encode_pairs, load_pairs  # noqa: E402
from lmforge.recipes.sft import ChatConfig, chat_format  # noqa: E402

BETA = 0.1


def build(args, root: Path) -> list[dict]:
    """The model dir (random GPT-2 with ChatML) and the pairs in TRL's layout (prompt / chosen / rejected ids)."""
    pairs = load_pairs(PairDataConfig(n_train=args.pairs_per_type, n_val=0, n_test=0))["train"]
    texts = [m["content"] for p in pairs[:400] for m in p.prompt + p.chosen + p.rejected]
    tok = Tokenizer.train(texts, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(family="gpt2", vocab_size=tok.vocab_size, d_model=args.d_model,
                                    n_layer=args.layers, n_head=args.heads, max_seq_len=256, dropout=0.0,
                                    eos_token_id=tok.eos_id, bos_token_id=tok.bos_id))
    fmt, _ = chat_format(ChatConfig(), model, tok)
    save_model(model, root / "model", tokenizer=tok)
    examples, _ = encode_pairs(PairEncoder(fmt, 256), {"train": pairs})
    out = []
    for e in examples["train"]:
        start = e["chosen_mask"].index(1)  # the rendered prompt: everything before the answer's first token
        if e["rejected_mask"].index(1) != start or e["chosen_ids"][:start] != e["rejected_ids"][:start]:
            continue
        out.append({"prompt_ids": e["chosen_ids"][:start], "chosen_ids": e["chosen_ids"][start:],
                    "rejected_ids": e["rejected_ids"][start:]})
    return out[: args.batch * (args.steps + args.warmup)]


def lmforge_side(root: Path, lora: bool):
    model, tok = load_model(root / "model")
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if lora:
        cfg = DeltaConfig(method="lora", r=8, alpha=16, dropout=0.0, target_modules=["c_attn"])
        apply_delta(model, cfg)
        reference = DisabledReference(lambda m: delta_disabled(m, cfg))
    else:
        reference = FrozenReference(copy.deepcopy(model).eval().requires_grad_(False))
    objective = PreferenceObjective(["sigmoid"], beta=BETA, reference=reference, pad_id=pad)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(examples) -> float:
        out = objective.loss(model, collate_pairs(examples, pad))
        loss = out.loss_sum / out.count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def trl_side(root: Path, lora: bool, tmp: Path):
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    hf = transformers.GPT2LMHeadModel.from_pretrained(str(root / "model"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(root / "model"))
    if hf_tok.pad_token is None:
        hf_tok.pad_token = hf_tok.eos_token
    ref = None
    if lora:
        import peft

        hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn"],
                                                     fan_in_fan_out=True))
    else:
        ref = copy.deepcopy(hf).eval().requires_grad_(False)
    args = DPOConfig(output_dir=str(tmp / "trl"), report_to="none", use_cpu=True, bf16=False, beta=BETA,
                     loss_type=["sigmoid"], per_device_train_batch_size=16, disable_tqdm=True)
    ds = datasets.Dataset.from_dict({"prompt": ["hi"], "chosen": [" a"], "rejected": [" b"]})
    trainer = DPOTrainer(model=hf, ref_model=ref, args=args, train_dataset=ds, processing_class=hf_tok)
    collate = DataCollatorForPreference(pad_token_id=hf_tok.pad_token_id)
    model = trainer.model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(examples) -> float:
        loss = trainer._compute_loss(model, collate(examples), False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def timed(step, batches, warmup: int) -> dict[str, float]:
    walls, cpus = [], []
    for i, b in enumerate(batches):
        w, c = time.perf_counter(), time.process_time()
        step(b)
        if i >= warmup:
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16, help="pairs per step")
    ap.add_argument("--pairs-per-type", type=int, default=40)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.layers, args.batch, args.steps, args.warmup, args.rounds = 64, 2, 4, 3, 1, 1
        args.pairs_per_type, args.vocab = 4, 512
    torch.set_num_threads(args.threads)
    result: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = build(args, root)
        batches = [pairs[i:i + args.batch] for i in range(0, len(pairs), args.batch)]
        batches = [b for b in batches if len(b) == args.batch]
        for setting, lora in (("full copy reference", False), ("LoRA, adapter-disabled reference", True)):
            ours, ref = lmforge_side(root, lora), trl_side(root, lora, root)
            # step 1 is ln 2 on both sides (policy = reference); step 2 follows one AdamW update of the same grads
            a = [ours(batches[0]), ours(batches[1])]
            b = [ref(batches[0]), ref(batches[1])]
            if any(abs(x - y) > 1e-4 * max(1.0, abs(y)) for x, y in zip(a, b)):
                raise SystemExit(f"{setting}: losses differ: lmforge {a}, TRL {b}")
            a = a[1]
            best: dict[str, dict[str, float]] = {}
            for _ in range(args.rounds):
                for name, make in (("lmforge", lambda: lmforge_side(root, lora)), ("trl", lambda: trl_side(root, lora, root))):
                    got = timed(make(), batches, args.warmup)
                    prev = best.get(name)
                    best[name] = got if prev is None else {k: min(prev[k], got[k]) for k in got}
            pairs_per = {n: {"pairs_per_s": args.batch / v["wall_s"], "pairs_per_cpu_s": args.batch / v["cpu_s"]}
                         for n, v in best.items()}
            result[setting] = {**pairs_per, "second_step_loss": a,
                               "ratio": pairs_per["lmforge"]["pairs_per_s"] / pairs_per["trl"]["pairs_per_s"],
                               "cpu_ratio": pairs_per["lmforge"]["pairs_per_cpu_s"] / pairs_per["trl"]["pairs_per_cpu_s"]}
            r = result[setting]
            print(f"{setting:>34}: lmforge {r['lmforge']['pairs_per_s']:7.1f} pairs/s "
                  f"({r['lmforge']['pairs_per_cpu_s']:.1f} per CPU s), TRL {r['trl']['pairs_per_s']:7.1f} pairs/s "
                  f"({r['trl']['pairs_per_cpu_s']:.1f} per CPU s): {r['ratio']:.2f}x (by CPU time {r['cpu_ratio']:.2f}x)")
    print(json.dumps({"bench": "dpo_step", "machine": machine(), "results": result,
                      "ratio": min(r["ratio"] for r in result.values()),  # the worse of the two settings
                      "shape": {"d_model": args.d_model, "layers": args.layers, "batch_pairs": args.batch,
                                "vocab": args.vocab, "steps": args.steps, "threads": args.threads,
                                "rounds": args.rounds}}))


if __name__ == "__main__":
    main()
