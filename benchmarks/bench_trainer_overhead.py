"""Trainer overhead: `lmforge pretrain`'s Trainer vs a bare forward/backward/step loop.

Same model (same initial weights), same batches (the same PackedWindows over the same world shards), same
math (chunked cross-entropy, AdamW from lmforge.train.optim, gradient clipping at 1.0).  The Trainer adds
logging (metrics.jsonl, progress lines), data-position tracking, LR schedule, the non-finite check and a
checkpoint at the end; the ratio of tokens/s (Trainer / bare, whole runs, best of 2 each, interleaved)
shows what that bookkeeping costs.  Target: >= 0.95.

    python benchmarks/bench_trainer_overhead.py          # 4 layers, d=192, seq 128, batch 16, 60 steps
    python benchmarks/bench_trainer_overhead.py --quick  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lmforge.data.loader import PackedWindows  # noqa: E402
from lmforge.objectives.causal_lm import CausalLMObjective  # noqa: E402
from lmforge.data.shards import build_shards, train_tokenizer  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.heads import chunked_cross_entropy  # noqa: E402
from lmforge.train.optim import build_optimizer  # noqa: E402
from lmforge.train import RunSpec, Trainer, TrainerConfig  # noqa: E402


def bare_loop(model: DecoderLM, source: PackedWindows, steps: int, batch: int, lr: float) -> float:
    opt = build_optimizer(model, lr, 0.1, [0.9, 0.95], 1e-8, "auto")
    params = [p for g in opt.param_groups for p in g["params"]]
    t = time.perf_counter()
    for _ in range(steps):
        b = source.next_batch(batch)
        loss_sum, n = chunked_cross_entropy(model(b["input_ids"]), model.lm_head, b["labels"])
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def trainer_run(model: DecoderLM, source: PackedWindows, steps: int, batch: int, lr: float, run_dir: Path) -> float:
    cfg = TrainerConfig(global_batch_size=batch, lr=lr, warmup_steps=5, log_every=10, eval_every=0,
                        ckpt_every=steps, keep_last=1, tensorboard=False, device="cpu")
    trainer = Trainer(model, CausalLMObjective(), source, cfg, RunSpec(run_dir, steps, seed=0, resume="false"),
                      progress=False)
    t = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 if the ratio is below 0.95")
    args = ap.parse_args()
    model_cfg = dict(family="gpt2", vocab_size=2048, d_model=192, n_layer=4, n_head=6, max_seq_len=256)
    if args.quick:
        args.steps, args.batch, args.seq = 6, 4, 32
        model_cfg.update(d_model=64, n_layer=2, n_head=2, vocab_size=512)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("LMFORGE_CACHE", str(tmp / "cache"))
        tok = train_tokenizer("world", model_cfg["vocab_size"], tmp / "tok", max_bytes=300_000, world_bytes=1_500_000)
        shards = build_shards("world", tok, world_bytes=1_500_000)
        torch.manual_seed(0)
        base = DecoderLM(DecoderConfig(**model_cfg))
        tokens_run = args.steps * args.batch * args.seq
        bare_times, trainer_times = [], []
        bare_loop(copy.deepcopy(base).train(), PackedWindows(shards.tokens("train"), args.seq, seed=1), 3, args.batch,
                  1e-3)  # warm up kernels and allocator, untimed
        for rep in range(1 if args.quick else 2):
            src = PackedWindows(shards.tokens("train"), args.seq, seed=0)
            bare_times.append(bare_loop(copy.deepcopy(base).train(), src, args.steps, args.batch, 1e-3))
            src = PackedWindows(shards.tokens("train"), args.seq, seed=0)
            trainer_times.append(trainer_run(copy.deepcopy(base).train(), src, args.steps, args.batch, 1e-3,
                                             tmp / f"run{rep}"))
    bare, trained = min(bare_times), min(trainer_times)
    result = {"benchmark": "trainer_overhead", "machine": machine(),
              "shape": f"gpt2 {model_cfg['n_layer']} layers d={model_cfg['d_model']}, seq {args.seq}, "
                       f"batch {args.batch}, {args.steps} steps",
              "bare_tokens_per_s": tokens_run / bare, "trainer_tokens_per_s": tokens_run / trained,
              "ratio": bare / trained, "bare_s": bare_times, "trainer_s": trainer_times}
    print(f"machine: {result['machine']}\nshape:   {result['shape']}")
    print(f"bare loop {tokens_run / bare:10.0f} tok/s   Trainer {tokens_run / trained:10.0f} tok/s   "
          f"ratio {result['ratio']:.3f} (target >= 0.95)")
    print(json.dumps(result))
    return 1 if args.check and result["ratio"] < 0.95 else 0


if __name__ == "__main__":
    raise SystemExit(main())
