"""Shared bits of the benchmark scripts: machine description, timing, matmul ceiling."""

from __future__ import annotations

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
