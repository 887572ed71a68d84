"""Resumable checkpoints: ``RUN_DIR/checkpoints/step_NNNNNNN/``.

One directory per saved step (7-digit, zero-padded: ``step_0000100``) holding

==========================  ====================================================================
``model.safetensors``       the model's full state dict in its own dtype — fp32 master weights
                            under mixed precision (never a bf16/fp16 copy); tied weights once
``optimizer.pt``            ``optimizer.state_dict()`` (AdamW moments or Adafactor factors, step counts)
``state.pt``                scheduler, grad scaler, RNG states (python, numpy, torch, cuda) and
                            the batch source's position (``train_source.state_dict()``)
``trainer_state.json``      step, tokens, elapsed time, best validation loss so far, last metrics
``COMPLETE``                written last; a directory without it is not a checkpoint
==========================  ====================================================================

The directory is assembled under a temporary name and renamed into place (:func:`lmforge.core.io.atomic_dir`),
so a run killed mid-save leaves at most a hidden ``.step_*.tmp`` directory, which is ignored and cleaned
up by the next save.  Frozen modules an objective owns (a DPO reference, a reward model) are not saved.

Retention: :func:`prune_checkpoints` keeps the ``keep_last`` newest checkpoints **plus** the
best-by-validation one, which ``RUN_DIR/checkpoints/best.json`` names (``{"step", "val_loss", "path"}``).

``.pt`` files are read with ``torch.load(weights_only=True)``: everything saved is tensors and plain
Python values (numpy arrays and scalars in RNG or data-source state are converted on the way in and back
on the way out).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model as load_safetensors, save_model as save_safetensors
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from lmforge.core.errors import ModelError, RunError
from lmforge.core.io import atomic_dir, atomic_write_json, replace_dir

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
BEST = "best.json"
_STEP_RE = re.compile(r"^step_(\d{7,})$")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, path)``, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """``{"step", <metric>, "path"}`` of the best-by-validation checkpoint, or None."""
    path = Path(run_dir) / CHECKPOINTS / BEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint directory ``best.json`` names, or None."""
    best = read_best(run_dir)
    return Path(run_dir) / CHECKPOINTS / str(best["path"]) if best is not None else None


def write_best(run_dir: str | Path, step: int, value: float, metric: str = "val_loss") -> None:
    """Name the best checkpoint so far: ``{"step", metric: value, "path"}`` (metric default ``val_loss``)."""
    atomic_write_json(Path(run_dir) / CHECKPOINTS / BEST,
                      {"step": step, metric: value, "path": checkpoint_dir(run_dir, step).name})


# ---- plain-value conversion (so .pt files load with weights_only=True) ----------------------------

def to_plain(obj: Any) -> Any:
    """numpy arrays/scalars -> tagged bytes / Python scalars, recursively through dicts, lists and tuples."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": (obj.dtype.str, tuple(obj.shape), np.ascontiguousarray(obj).tobytes())}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            dtype, shape, data = obj["__ndarray__"]
            return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_plain(v) for v in obj)
    return obj


# ---- save / load ----------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_NNNNNNN`` atomically and return its path.

    ``state``: tensors/plain values for ``state.pt`` (scheduler, scaler, rng, data);
    ``trainer_state``: JSON-able values for ``trainer_state.json``.
    """
    path = checkpoint_dir(run_dir, step)
    with atomic_dir(path) as tmp:
        save_safetensors(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(to_plain(state), tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2) + "\n",
                                                encoding="utf-8")
        (tmp / COMPLETE).write_text("ok\n", encoding="utf-8")
    return path


SHARDED = "dcp"


def save_sharded_checkpoint(run_dir: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], trainer_state: dict[str, Any], dist: Any) -> Path:
    """The fsdp form of :func:`save_checkpoint` (a collective: every rank calls it).

    Model and optimizer state go through ``torch.distributed.checkpoint`` into ``dcp/``, each rank writing
    its own shards, keyed by parameter name so that a different world size can load them (resharding);
    ``state.pt``, ``trainer_state.json`` and ``COMPLETE`` come from rank 0, which renames the directory into
    place once every rank has written (same atomic rule as a single-process checkpoint).
    """
    path = checkpoint_dir(run_dir, step)
    tmp = path.parent / f".{path.name}.tmp"  # one name every rank derives: no broadcast needed
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDED))
    dist.barrier()
    if dist.is_main:
        torch.save(to_plain(state), tmp / "state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2) + "\n",
                                                encoding="utf-8")
        (tmp / COMPLETE).write_text("ok\n", encoding="utf-8")
        replace_dir(tmp, path)
    dist.barrier()
    return path


def load_sharded_checkpoint(path: str | Path, *, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore a sharded (``dcp/``) checkpoint into a sharded model (and its optimizer), whatever world size
    wrote it; returns the same dict as :func:`load_checkpoint`."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise RunError(f"'{path}' is not a complete checkpoint (no {COMPLETE} marker); resume from another one")
    if not (path / SHARDED).is_dir():
        raise RunError(f"checkpoint '{path}' holds full (unsharded) weights, written without fsdp; resume it with "
                       f"the distributed.strategy it was written with (none, ddp or zero1)")
    if optimizer is None:  # weights only (the checkpoint's optimizer entries are left unread)
        loaded = {"model": get_model_state_dict(model)}
        dcp.load(loaded, checkpoint_id=str(path / SHARDED))
        set_model_state_dict(model, loaded["model"])
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        loaded = {"model": model_sd, "optim": optim_sd}
        # Partial: a trainable parameter that never had a gradient has no AdamW state in the checkpoint; every
        # model weight is still required (checked below), and parameter and optimizer entries share their names.
        dcp.load(loaded, checkpoint_id=str(path / SHARDED), planner=DefaultLoadPlanner(allow_partial_load=True))
        stored = _require_keys(path, model_sd)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        # get_state_dict gave every parameter a placeholder state (zero moments, step 1); one that had none when
        # saved must have none now, or its first AdamW step after the resume uses the wrong bias correction.
        stateless = {name for name in optim_sd.get("state", {}) if not any(
            k.startswith(f"optim.state.{name}.") for k in stored)}
        for name, p in model.named_parameters():
            if name in stateless:
                optimizer.state.pop(p, None)
    state = from_plain(torch.load(path / "state.pt", map_location="cpu", weights_only=True))
    trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return {**trainer_state, **state}


def _require_keys(path: Path, model_sd: dict[str, Any]) -> set[str]:
    """Every model weight must be in the sharded checkpoint (the optimizer part may be partial); returns the
    checkpoint's keys."""
    stored = set(dcp.FileSystemReader(str(path / SHARDED)).read_metadata().state_dict_metadata)
    missing = [k for k in model_sd if f"model.{k}" not in stored]
    if missing:
        raise ModelError(f"checkpoint '{path}' does not match the model (missing {', '.join(missing[:5])}); resume "
                         f"with the model config the run was started with")
    return stored


def load_model_weights(model: nn.Module, path: str | Path, device: torch.device | str = "cpu") -> None:
    """Load ``model.safetensors`` of a checkpoint dir into ``model`` (tied weights handled)."""
    file = Path(path) / "model.safetensors"
    if not file.is_file() and (Path(path) / SHARDED).is_dir():
        raise RunError(f"checkpoint '{path}' is sharded (written under distributed.strategy=fsdp); resume it with "
                       f"distributed.strategy=fsdp (any number of ranks)")
    if not file.is_file():
        raise RunError(f"checkpoint '{path}' has no model.safetensors; delete that directory to resume from an "
                       f"earlier checkpoint")
    missing, unexpected = load_safetensors(model, file, strict=False, device=str(device))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(sorted(missing)[:5])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(sorted(unexpected)[:5])}")
        raise ModelError(f"checkpoint '{file}' does not match {type(model).__name__} ({'; '.join(parts)}); "
                         f"resume with the model config the run was started with")


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    device: torch.device | str = "cpu", optimizer_map_location: Any = None) -> dict[str, Any]:
    """Restore model (and optimizer) from a checkpoint dir; return ``trainer_state.json`` merged with
    ``state.pt`` (keys ``scheduler``, ``scaler``, ``rng``, ``data`` ... as saved)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise RunError(f"'{path}' is not a complete checkpoint (no {COMPLETE} marker); resume from another one")
    load_model_weights(model, path, device)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=optimizer_map_location or device,
                                             weights_only=True))
    state = from_plain(torch.load(path / "state.pt", map_location="cpu", weights_only=True))
    trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return {**trainer_state, **state}


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints (``<= 0``: keep all), always keeping the
    best one named by ``best.json``; also remove leftovers of interrupted saves."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(".step_") and (d.name.endswith(".tmp") or d.name.endswith(".old")):
            shutil.rmtree(d, ignore_errors=True)
    if keep_last <= 0:
        return
    found = list_checkpoints(run_dir)
    best = read_best(run_dir)
    keep = {p for _, p in found[-keep_last:]}
    if best is not None:
        keep.add(root / str(best.get("path", "")))
    for _, p in found:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
