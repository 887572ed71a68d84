"""Training throughput and MFU of lmforge's Trainer step (forward, backward, clip, fused AdamW), one device or
many under torchrun.

MFU = tokens/s × FLOPs per token / (peak × ranks), FLOPs per token = 6·N + 12·L·d·T (N = non-embedding
parameters + LM head; lmforge.models.flops).  The peak is the device's dense bf16 figure from its data sheet
(H100/H200/A100/...; ``LMFORGE_PEAK_TFLOPS`` overrides); the same-process reference is a large matmul's
measured FLOP/s (bf16 on CUDA, fp32 on CPU), printed beside it, with MFU against that ceiling as ``ratio``.

    python benchmarks/bench_throughput.py --model gpt2-124m                 # GPU: bf16 autocast, compile, fused AdamW
    python benchmarks/bench_throughput.py --model llama-350m
    torchrun --nproc_per_node=8 benchmarks/bench_throughput.py --model gpt2-124m --strategy fsdp
    python benchmarks/bench_throughput.py --quick                           # tiny model on CPU (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, matmul_ceiling  # noqa: E402

from lmforge.objectives.causal_lm import CausalLMObjective  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.flops import config_params, device_peak_flops, flops_per_token  # noqa: E402
from lmforge.train.distributed import DistributedConfig, setup_distributed  # noqa: E402
from lmforge.train import RunSpec, Trainer, TrainerConfig  # noqa: E402

MODELS = {
    # GPT-2 small: 124M parameters (vocab padded to a multiple of 64).
    "gpt2-124m": dict(family="gpt2", vocab_size=50304, d_model=768, n_layer=12, n_head=12, max_seq_len=1024),
    # A ~350M Llama-style decoder (untied, SwiGLU, RoPE; ~300M non-embedding + 2 × 33M embedding/head).
    "llama-350m": dict(family="llama", vocab_size=32000, d_model=1024, n_layer=24, n_head=16, n_kv_head=16,
                       d_ff=2816, max_seq_len=1024, tie_embeddings=False),
    "tiny": dict(family="gpt2", vocab_size=512, d_model=64, n_layer=2, n_head=2, max_seq_len=64),
}


class RandomWindows:
    """Random token windows (throughput does not depend on the data)."""

    def __init__(self, vocab: int, seq: int) -> None:
        self.vocab, self.seq, self.pos = vocab, seq, 0
        self.objective = CausalLMObjective()

    def next_batch(self, n: int):
        g = torch.Generator().manual_seed(self.pos)
        self.pos += 1
        return self.objective.collate(torch.randint(0, self.vocab, (n, self.seq + 1), generator=g))

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = int(state["pos"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt2-124m")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=16, help="rows per forward/backward per rank")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step per rank")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--strategy", default="auto", help="distributed.strategy under torchrun")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps, CPU (smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.seq, args.micro_batch, args.steps, args.warmup = "tiny", 32, 4, 3, 1

    dist, device = setup_distributed(DistributedConfig(strategy=args.strategy), "auto")
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    config = DecoderConfig(**{**MODELS[args.model], "max_seq_len": max(args.seq, MODELS[args.model]["max_seq_len"])})
    torch.manual_seed(0)
    model = DecoderLM(config)
    global_batch = args.micro_batch * args.accum * dist.world_size
    cfg = TrainerConfig(global_batch_size=global_batch, micro_batch_size=args.micro_batch, lr=3e-4, warmup_steps=0,
                        precision="bf16" if on_gpu else "fp32", compile=on_gpu and not args.no_compile,
                        device=str(dev), tensorboard=False, ckpt_every=0, log_every=10**9, fused_adamw="auto")
    source = RandomWindows(config.vocab_size, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(dist.broadcast_object(tmp))
        trainer = Trainer(model, source.objective, source, cfg, RunSpec(run_dir / "run", 10**9), progress=False,
                          dist=dist)
        trainer.model.train()

        def step() -> None:
            trainer.train_step(source.next_batch(global_batch))

        for _ in range(args.warmup):
            step()
        if on_gpu:
            torch.cuda.synchronize(dev)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        if on_gpu:
            torch.cuda.synchronize(dev)
        dist.barrier()
        elapsed = time.perf_counter() - t

    tokens_per_s = args.steps * global_batch * args.seq / elapsed
    fpt = flops_per_token(config, args.seq)
    achieved = tokens_per_s * fpt / dist.world_size  # FLOP/s per device
    peak = device_peak_flops(dev, torch.bfloat16 if on_gpu else None)
    ceiling = matmul_ceiling(8192 if on_gpu else 1024, torch.bfloat16 if on_gpu else torch.float32, str(dev))
    result = {"benchmark": "throughput", "model": args.model, "params_non_embedding": config_params(config),
              "seq": args.seq, "global_batch": global_batch, "ranks": dist.world_size,
              "strategy": dist.strategy, "device": torch.cuda.get_device_name(dev) if on_gpu else "cpu",
              "tokens_per_s": tokens_per_s, "flops_per_token": fpt, "achieved_tflops_per_device": achieved / 1e12,
              "matmul_ceiling_tflops": ceiling / 1e12, "peak_tflops": peak / 1e12 if peak else None,
              "mfu": achieved / peak if peak else None, "ratio": achieved / ceiling}
    if dist.is_main:
        print(machine())
        print(f"{args.model}: {config_params(config) / 1e6:.1f}M non-embedding params, seq {args.seq}, global batch "
              f"{global_batch}, {dist.describe()}, {'bf16 autocast' if on_gpu else 'fp32'}"
              f"{', compiled' if cfg.compile else ''}")
        print(f"tokens/s {tokens_per_s:,.0f} | {achieved / 1e12:.2f} TFLOP/s per device | matmul ceiling "
              f"{ceiling / 1e12:.2f} TFLOP/s ({achieved / ceiling:.1%}) | "
              + (f"MFU {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s peak" if peak else "MFU n/a (peak unknown)"))
        print(json.dumps(result))
    dist.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
