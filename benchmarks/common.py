"""Shared bits of the benchmark scripts: machine description, timing, matmul ceiling."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {dev}, "
            f"torch {torch.__version__}, python {platform.python_version()}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], None], steps: int, warmup: int = 2) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def matmul_ceiling(n: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu", reps: int = 5) -> float:
    """FLOP/s of a large square matmul: the practical peak the model's matmuls are measured against."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    med, _ = median_time(lambda: torch.mm(a, b), reps, warmup=2)
    return 2 * n**3 / med


def add_gpt2_shape_args(ap: argparse.ArgumentParser) -> None:
    """The GPT-2 benchmark shape (6 layers, d=384, seq 256, batch 8, vocab 8192) and ``--quick``."""
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 3 steps (smoke run)")


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.layers, args.d_model, args.heads, args.seq, args.batch, args.vocab, args.steps = 2, 64, 2, 32, 2, 512, 3


def lm_loss_pair(ours: torch.nn.Module, ref: torch.nn.Module, vocab: int, batch: int, seq: int
                 ) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """Mean next-token losses of an lmforge decoder and a transformers causal LM on one random batch, with the
    same targets (transformers shifts labels inside and drops the last position's target), asserted equal."""
    from lmforge.models.heads import chunked_cross_entropy

    window = torch.randint(0, vocab, (batch, seq + 1))
    inputs = window[:, :-1].contiguous()
    labels_ours = window[:, 1:].clone()
    labels_ours[:, -1] = -100

    def loss_ours() -> torch.Tensor:
        total, n = chunked_cross_entropy(ours(inputs), ours.lm_head, labels_ours)
        return total / n

    def loss_ref() -> torch.Tensor:
        return ref(input_ids=inputs, labels=inputs).loss

    torch.testing.assert_close(loss_ours(), loss_ref(), rtol=1e-5, atol=1e-5)
    return loss_ours, loss_ref


def paired_times(fn_a: Callable[[], None], fn_b: Callable[[], None], steps: int) -> tuple[float, float]:
    """Median step time of two contenders measured A, B, A, B (each round ``steps`` steps, 2 warm-up steps
    the first time); each gets the better of its two medians, so load drift hits both alike."""
    a1, _ = median_time(fn_a, steps)
    b1, _ = median_time(fn_b, steps)
    a2, _ = median_time(fn_a, steps, warmup=0)
    b2, _ = median_time(fn_b, steps, warmup=0)
    return min(a1, a2), min(b1, b2)

