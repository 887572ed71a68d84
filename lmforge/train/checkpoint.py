"""Resumable checkpoints: ``RUN_DIR/checkpoints/step_NNNNNNN/``.

One directory per saved step (7-digit, zero-padded: ``step_0000100``) holding

==========================  ====================================================================
``model.safetensors``       the model's full state dict in its own dtype — fp32 master weights
                            under mixed precision (never a bf16/fp16 copy); tied weights once
``optimizer.pt``            ``optimizer.state_dict()`` (AdamW moments or Adafactor factors, step counts)
``state.pt``                scheduler, grad scaler, RNG states (python, numpy, torch, cuda) and
                            the batch source's position (``train_source.state_dict()``)
``trainer_state.json``      step, tokens, elapsed time, best validation loss so far, last metrics
``manifest.json``           every other file's size and sha256 (written after them)
``COMPLETE``                written last; a directory without it is not a checkpoint
==========================  ====================================================================

The directory is assembled under a temporary name, fsynced and renamed into place
(:func:`lmforge.core.io.atomic_dir`), so a run killed mid-save leaves at most a hidden ``.step_*.tmp``
directory, which is ignored and cleaned up by the next save.  Frozen modules an objective owns (a DPO
reference, a reward model) are not saved.

Verification (:func:`verify_checkpoint`): before a resume the chosen checkpoint's files are checked against
its manifest (sizes, then sha256: about 1.5 GB/s, the files hashed in parallel); a checkpoint an older lmforge
wrote without a manifest is checked for what can be checked (its files present, ``trainer_state.json``
readable, ``model.safetensors`` as long as its header says, the ``.pt`` archives' CRCs).
:func:`resume_checkpoint` picks the newest checkpoint that verifies; a newer bad one (a power cut, a
truncated copy) is renamed aside to ``step_NNNNNNN.bad`` — kept for inspection, no longer a checkpoint — and
one line says which one was bad, why, and which one is used.  :func:`last_good_checkpoint` is the same choice
without renaming anything (what the non-finite error names).

Retention: :func:`prune_checkpoints` keeps the ``keep_last`` newest checkpoints **plus** the
best-by-validation one, which ``RUN_DIR/checkpoints/best.json`` names (``{"step", "val_loss", "path"}``).

``.pt`` files are read with ``torch.load(weights_only=True)``: everything saved is tensors and plain
Python values (numpy arrays and scalars in RNG or data-source state are converted on the way in and back
on the way out).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, load_model as load_safetensors, save_model as save_safetensors
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from lmforge.core.errors import ModelError, RunError
from lmforge.core.finite import first_nonfinite
from lmforge.core.io import atomic_dir, atomic_write_json, replace_dir, writing

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
BEST = "best.json"
BAD_SUFFIX = ".bad"
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
        with writing(path / "model.safetensors"):
            save_safetensors(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
        with writing(path / "optimizer.pt"):
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        _finish(tmp, path, step, state, trainer_state)
    return path


def _finish(tmp: Path, path: Path, step: int, state: dict[str, Any], trainer_state: dict[str, Any]) -> None:
    """What every checkpoint form ends with, in this order: ``state.pt``, ``trainer_state.json``, the manifest of
    all of them, ``COMPLETE`` (``tmp``: the directory being written; ``path``: its published name)."""
    with writing(path / "state.pt"):
        torch.save(to_plain(state), tmp / "state.pt")
    with writing(path / "trainer_state.json"):
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2) + "\n",
                                                encoding="utf-8")
    write_manifest(tmp, path)
    with writing(path / COMPLETE):
        (tmp / COMPLETE).write_text(f"ok\n{MANIFEST}\n", encoding="utf-8")  # (older lmforge: "ok", no manifest)


SHARDED = "dcp"


def save_sharded_checkpoint(run_dir: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], trainer_state: dict[str, Any], dist: Any) -> Path:
    """The fsdp form of :func:`save_checkpoint` (a collective: every rank calls it).

    Model and optimizer state go through ``torch.distributed.checkpoint`` into ``dcp/``, each rank writing
    its own shards, keyed by parameter name so that a different world size can load them (resharding);
    ``state.pt``, ``trainer_state.json``, the manifest (every rank's shard files too) and ``COMPLETE`` come
    from rank 0, which renames the directory into place once every rank has written (same atomic rule as a
    single-process checkpoint).
    """
    path = checkpoint_dir(run_dir, step)
    tmp = path.parent / f".{path.name}.tmp"  # one name every rank derives: no broadcast needed
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with writing(path / SHARDED):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDED))
    dist.barrier()
    if dist.is_main:
        _finish(tmp, path, step, state, trainer_state)
        replace_dir(tmp, path)
    dist.barrier()
    return path


# ---- manifest and verification --------------------------------------------------------------------

def _listed_files(root: Path) -> list[str]:
    """The files a manifest lists: everything under ``root`` but the manifest and the marker (relative, sorted)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and str(p.relative_to(root)) not in (MANIFEST, COMPLETE))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """sha256 of each file, several at once (hashlib releases the GIL: the model and optimizer files, the bulk
    of a checkpoint, hash side by side)."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        return list(pool.map(_sha256, paths))


def write_manifest(tmp: Path, path: Path) -> None:
    """``manifest.json`` in the checkpoint being written at ``tmp``: each file's size and sha256."""
    names = _listed_files(tmp)
    digests = _sha256_all([tmp / n for n in names])
    files = {n: {"size": (tmp / n).stat().st_size, "sha256": d} for n, d in zip(names, digests)}
    with writing(path / MANIFEST):
        (tmp / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n", encoding="utf-8")


def _missing_file(path: Path) -> str | None:
    """The first file every checkpoint needs that ``path`` lacks (whatever its manifest lists), or None."""
    weights = ["model.safetensors", "optimizer.pt"] if not (path / SHARDED).is_dir() else [f"{SHARDED}/.metadata"]
    return next((n for n in [*weights, "state.pt", "trainer_state.json"] if not (path / n).is_file()), None)


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file shorter or longer than its own header says, or with an unreadable header."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError):
        return f"{file.name} has an unreadable header"
    size, want = file.stat().st_size, 8 + n + end
    return None if size == want else f"{file.name} has {size} bytes, its header says {want}"


def _unlisted_problem(path: Path) -> str | None:
    """What can be checked in a checkpoint without a manifest (one an older lmforge wrote)."""
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "trainer_state.json is unreadable"
    if (path / "model.safetensors").is_file():
        problem = _safetensors_problem(path / "model.safetensors")
        if problem:
            return problem
    for name in ("optimizer.pt", "state.pt"):
        if not (path / name).is_file():
            continue
        try:
            with zipfile.ZipFile(path / name) as archive:
                bad = archive.testzip()  # reads every member against its CRC-32
        except (OSError, zipfile.BadZipFile, EOFError, ValueError):
            return f"{name} is not a complete archive"
        if bad is not None:
            return f"{name} fails its CRC check ({bad})"
    return None


def _manifest_problem(path: Path, checksums: bool) -> str | None:
    """Each file the manifest lists against its size and (``checksums``) its sha256."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        listed = [(str(n), int(e["size"]), str(e["sha256"])) for n, e in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, size, _ in listed:
        if not (path / name).is_file():
            return f"{name} is missing"
        actual = (path / name).stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, {MANIFEST} says {size}"
    if checksums:
        for (name, _, want), got in zip(listed, _sha256_all([path / n for n, _, _ in listed])):
            if got != want:
                return f"{name} does not match its sha256 in {MANIFEST}"
    return None


_verified: dict[Path, tuple[Any, str | None]] = {}  # verdicts of this process, by the files' sizes and times


def _nonfinite_problem(path: Path) -> str | None:
    weights = path / "model.safetensors"
    if not weights.is_file():
        return None
    try:
        bad = first_nonfinite(load_file(weights))
    except Exception as e:  # noqa: BLE001 - a file the size checks passed but safetensors cannot read
        return f"model.safetensors is unreadable ({type(e).__name__})"
    return f"model.safetensors holds a non-finite value ({bad})" if bad else None


def verify_checkpoint(path: str | Path, checksums: bool = True) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (a phrase naming the file), or None when it verifies:
    with a manifest, every file's size and (``checksums``) sha256; without one, what can be checked; with
    ``checksums``, also that its weights are finite (an earlier lmforge could save a diverged model; a sharded
    checkpoint is taken as it is, every save checks the state first).  ``checksums=False`` reads no file's
    contents.  A verdict is remembered while the files' sizes and modification times stay the same."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        return f"no {COMPLETE} marker"
    missing = _missing_file(path)
    if missing:
        return f"{missing} is missing"
    stamp = (checksums, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
                              if p.is_file()))
    known = _verified.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    if (path / MANIFEST).exists():
        problem = _manifest_problem(path, checksums)
    elif MANIFEST in (path / COMPLETE).read_text(encoding="utf-8", errors="replace"):
        problem = f"{MANIFEST} is missing"  # this lmforge wrote it with one: not an older checkpoint
    else:
        problem = _unlisted_problem(path)
    if problem is None and checksums:
        problem = _nonfinite_problem(path)
    _verified[path] = (stamp, problem)
    return problem


def last_good_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint that verifies (:func:`verify_checkpoint`: manifest sizes and checksums,
    finite weights), or None; changes nothing.  What "the last good checkpoint" means wherever lmforge names one
    (the non-finite errors, ``resume=true``'s check) and where a resume falls back to (:func:`resume_checkpoint`)."""
    for _, path in reversed(list_checkpoints(run_dir)):
        if verify_checkpoint(path) is None:
            return path
    return None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resume_checkpoint(run_dir: str | Path, say: Callable[[str], None] = _say) -> Path | None:
    """The checkpoint a resume starts from: the newest that verifies.  Each newer one that does not is renamed
    aside to ``step_NNNNNNN.bad`` (so that pruning, ``best.json`` and the next resume no longer see it) and one
    line, given to ``say``, names them, why, and the checkpoint used; ``best.json`` naming a set-aside one is
    rewound to the best the used checkpoint knew."""
    bad: list[tuple[Path, str]] = []
    chosen = None
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            chosen = path
            break
        bad.append((path, problem))
    if not bad:
        return chosen
    for path, _ in bad:
        aside = path.with_name(path.name + BAD_SUFFIX)
        if aside.exists():  # an earlier bad copy of the same step, already reported
            shutil.rmtree(aside)
        path.rename(aside)
    _rewind_best(run_dir, chosen)
    what = "; ".join(f"checkpoint {p.name} is bad ({why}), set aside as {p.name}{BAD_SUFFIX}" for p, why in bad)
    then = f"resuming from {chosen.name}" if chosen else "no good checkpoint left: starting from step 0"
    say(f"warning: {what}; {then}")
    return chosen


def _rewind_best(run_dir: str | Path, chosen: Path | None) -> None:
    """After a fallback to ``chosen``: a ``best.json`` whose checkpoint was set aside names the best that
    ``chosen`` recorded instead (or is removed when that one is gone too: the resumed run writes it again)."""
    best = read_best(run_dir)
    root = Path(run_dir) / CHECKPOINTS
    if best is None or (root / str(best.get("path", "")) / COMPLETE).is_file():
        return
    known = json.loads((chosen / "trainer_state.json").read_text(encoding="utf-8")) if chosen else {}
    step, value = known.get("best_step"), known.get("best_value", known.get("best_val_loss"))
    if step is not None and value is not None and (checkpoint_dir(run_dir, step) / COMPLETE).is_file():
        write_best(run_dir, int(step), float(value), str(known.get("best_metric") or "val_loss"))
    else:
        (root / BEST).unlink()


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
    ``state.pt`` (keys ``scheduler``, ``scaler``, ``rng``, ``data`` ... as saved).  Verification is the caller's
    (:func:`resume_checkpoint` before a resume)."""
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
    best one named by ``best.json`` and the newest one whose files still have their manifest's sizes (so a bad
    newer checkpoint never costs the last good one); also remove leftovers of interrupted saves."""
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
    # sizes only: the checkpoints here were just written or verified at the resume, hashing them again is waste
    keep.update([next((p for _, p in reversed(found) if verify_checkpoint(p, checksums=False) is None), root)])
    for _, p in found:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
