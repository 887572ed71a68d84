"""Is every value finite?  The check that keeps NaN and infinity out of every checkpoint and model dir lmforge
writes (:meth:`lmforge.train.trainer.Trainer.save_checkpoint`, :func:`lmforge.models.io.save_model`).

A flag stays on its tensor's device (no host read), so a caller checking many tensors pays one read for all of
them; a sharded (DTensor) tensor is checked on this rank's shard, and the ranks combine their flags themselves.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch


def nonfinite_flag(*tensors: Any) -> torch.Tensor:
    """A 0-d bool tensor, on the first tensor's device: does any floating-point tensor among ``tensors`` hold a NaN
    or an infinity?  Other values (integer buffers, plain numbers) are finite by definition."""
    flags = []
    for t in tensors:
        if not torch.is_tensor(t):
            continue
        t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            flags.append((~torch.isfinite(t)).any())
    if not flags:
        return torch.zeros((), dtype=torch.bool)
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).any()


def first_nonfinite(named: Mapping[str, Any]) -> str | None:
    """The name of the first entry of ``named`` (e.g. a state dict) holding a NaN or an infinity, or None."""
    names = list(named)
    if not names:
        return None
    flags = [nonfinite_flag(named[n]) for n in names]
    device = flags[0].device
    bad = torch.stack([f.to(device) for f in flags]).nonzero()  # the one host read
    return names[int(bad[0])] if len(bad) else None
