"""Batch dicts as the Trainer sees them: row count, row slices, micro-batches, device moves.

A batch is a dict whose tensor (or list) entries share a leading dimension, the rows; other entries (scalars,
strings) ride along unchanged in every slice.  The Trainer splits a global batch into micro-batches with
:func:`split_batch`; under data parallelism each rank first keeps its rows (``Dist.shard_batch``), both by
:func:`slice_rows`.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.core.errors import RunError


def batch_rows(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.dim() > 0:
            return v.shape[0]
    raise RunError("the batch source returned a batch without tensors; next_batch(n) must return a dict of "
                   "tensors with leading dimension n")


def slice_rows(batch: dict[str, Any], rows: int, lo: int, hi: int) -> dict[str, Any]:
    """Rows ``[lo, hi)`` of every entry whose leading dim is ``rows`` (views, no copies)."""
    return {k: v[lo:hi] if (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows)
            or (isinstance(v, list) and len(v) == rows) else v for k, v in batch.items()}


def split_batch(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """Chunks of ``size`` rows (views, no copies)."""
    n = batch_rows(batch)
    if n <= size:
        return [batch]
    return [slice_rows(batch, n, start, start + size) for start in range(0, n, size)]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
