"""Run directories: create, refuse to clobber, resume safely.

:func:`prepare_run_dir` is called once before training, by the process that holds the run dir's lock
(:mod:`lmforge.train.runlock`: one live process per run dir).  It

1. creates ``run_dir`` (one-line :class:`RunError` if it cannot be written);
2. decides whether this run resumes, from ``resume``:

   - ``false``: the directory must not already hold a run (metrics lines or checkpoints) — lmforge never trains
     over an existing run; a ``config.yaml`` alone (a run that failed before its first step) is taken over;
   - ``true``: continue from the latest complete checkpoint that verifies (its manifest's sizes and
     checksums), which must exist — a bad newer one is set aside when training starts
     (:func:`lmforge.train.checkpoint.resume_checkpoint`);
   - ``auto``: resume when such a checkpoint exists, else start from step 0 (an existing run dir
     without a checkpoint — a run killed before its first save — is started over, after the config check);

3. when the directory already holds a run, compares its ``config.yaml`` with the new config and refuses
   any changed key outside the *mutable* set, naming the keys;
4. writes the resolved ``config.yaml`` atomically.

Keys that may change on resume (:data:`DEFAULT_MUTABLE_KEYS`): they change how long the run goes, what it
records, where and how it computes — never what it computes:

- ``max_steps`` (the LR schedule follows the new horizon from the resume point), ``resume``, ``run_dir``
  (the directory may have been moved);
- ``train.log_every``, ``train.eval_every``, ``train.eval_max_batches``, ``train.ckpt_every``,
  ``train.keep_last``, ``train.tensorboard``;
- ``train.device`` (e.g. continue a CPU run on a GPU), ``train.micro_batch_size`` (the Trainer normalises
  by the global batch's target count, so accumulation does not change the gradient), ``train.compile``,
  ``train.activation_checkpointing``, ``train.fused_adamw``;
- what a non-finite step does: ``train.nonfinite``, ``train.max_skipped_steps`` (a run that stopped at a bad
  step resumes with ``train.nonfinite=skip``; steps with a finite gradient compute the same either way);
- how the work is spread: ``distributed.*`` except ``param_dtype`` (the number of ranks is not a config key
  at all; an fsdp checkpoint resumes on any number of ranks).

Everything else — the model, the data, the seed, batch size, learning rate, schedule, precision — is fixed
for the life of a run: start a new ``run_dir`` to change it.  Recipes may widen the set (e.g. ``eval.*``)
by passing ``mutable_keys``; an entry ``a.b`` also covers every key below it (``a.b.c``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

from lmforge.core.config import diff_configs, dump_yaml
from lmforge.core.errors import ConfigError, RunError
from lmforge.core.io import atomic_write_text
from lmforge.core.outputs import MARKER, describe, entries, foreign_entries, read_marker
from lmforge.train.checkpoint import CHECKPOINTS, last_good_checkpoint, list_checkpoints, verify_checkpoint

DEFAULT_MUTABLE_KEYS: frozenset[str] = frozenset({
    "max_steps", "resume", "run_dir", "overwrite",
    "train.log_every", "train.eval_every", "train.eval_max_batches", "train.ckpt_every", "train.keep_last",
    "train.tensorboard",
    "train.device", "train.micro_batch_size", "train.compile", "train.activation_checkpointing",
    "train.fused_adamw", "train.nonfinite", "train.max_skipped_steps",
    "distributed.strategy", "distributed.backend", "distributed.reshard_after_forward", "distributed.cpu_offload",
    "distributed.find_unused_parameters", "distributed.timeout_s",
})

# Keys a newer lmforge added, each with the value that does what runs saved before the key existed did.  A saved
# config that lacks one of these, resumed at that value, is no change; at another value it is one.
ADDED_KEYS: dict[str, Any] = {
    "data.txt_split": "paragraph",  # .txt training files were always split at blank lines
}

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


def normalize_resume(resume: Any) -> str:
    """``auto|true|false`` (also accepts bools and None = auto)."""
    if resume is None:
        return "auto"
    if isinstance(resume, bool):
        return "true" if resume else "false"
    value = str(resume).strip().lower()
    if value not in ("auto", "true", "false"):
        raise ConfigError(f"resume must be auto, true or false; got {resume!r}")
    return value


def _is_mutable(key: str, mutable_keys: Iterable[str]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in mutable_keys)


def _lookup(d: dict[str, Any], dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<unset>"
        node = node[part]
    return node


def _ensure_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise RunError(f"run dir '{run_dir}' is not writable ({reason}); choose a run_dir you can write to") from None


def has_run(run_dir: str | Path) -> bool:
    """Does ``run_dir`` already hold a run that got going: a metrics line or a checkpoint?  A ``config.yaml``
    alone is a run that failed before its first step (a bad value, a data error): it holds nothing worth keeping,
    so a re-run with any ``resume`` but ``true`` takes the directory over, whatever its config was."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    return (metrics.is_file() and metrics.stat().st_size > 0) or (
        (run_dir / CHECKPOINTS).is_dir() and any((run_dir / CHECKPOINTS).iterdir()))


def _leftover_of_a_run(run_dir: Path, name: str) -> bool:
    """Is entry ``name`` of a dir without a run something lmforge left there for a run: a temporary or hidden file,
    the tokenizer a run trained before it was cut off (``tokenizer/`` marked ``run-tokenizer``), or the marker of a
    bench's run dir, or what a start that failed before its first step wrote?"""
    if name.startswith("."):
        return True
    if name in (CONFIG_FILE, METRICS_FILE, CHECKPOINTS):  # a start that failed before its first step (see has_run)
        return _written_by_a_start(run_dir / name)
    marker = read_marker(run_dir / name) if name != MARKER else read_marker(run_dir)
    if name == MARKER:
        return marker is not None and marker.get("kind") == "bench-run"
    return name == "tokenizer" and marker is not None and marker.get("kind") == "run-tokenizer" and \
        not foreign_entries(run_dir / name)


def _written_by_a_start(path: Path) -> bool:
    """An empty metrics.jsonl or checkpoints/, or a config.yaml lmforge resolved (a mapping naming a run_dir)."""
    if path.name != CONFIG_FILE:
        return (path.is_file() and path.stat().st_size == 0) or (path.is_dir() and not any(path.iterdir()))
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(saved, dict) and "run_dir" in saved


def check_run_outputs(run_dir: str | Path, overwrite: bool = False) -> None:
    """Refuse a run dir whose files the run would replace though lmforge did not write them for it, unless
    ``overwrite`` (then only the files the run writes are replaced; nothing else is deleted).  A dir holding a run
    owns its outputs (resume decides) except a ``model/`` lmforge did not write (the export would replace it); a
    dir without a run must hold nothing but what an interrupted start of a run left.  Recipes call it after
    :func:`check_run_dir`, before any work."""
    run_dir = Path(run_dir)
    if overwrite or not run_dir.is_dir():
        return
    if has_run(run_dir):
        foreign = foreign_entries(run_dir / "model")
        if foreign:
            raise RunError(f"run dir '{run_dir}' has a model/ that lmforge did not write for this run "
                           f"({describe(foreign, run_dir / 'model')}); move it away, or pass overwrite=true to "
                           f"write the run's model files into it (files of other names are kept)")
        return
    stray = [n for n in entries(run_dir) if not _leftover_of_a_run(run_dir, n)]
    if stray:
        raise RunError(f"run dir '{run_dir}' holds no run (no metrics or checkpoints) but files lmforge did not write "
                       f"({describe(stray, run_dir)}); choose a new or empty run_dir, or pass overwrite=true to "
                       f"write the run beside them (files of other names are kept)")


def _added_at_old_behaviour(key: str, value: Any) -> bool:
    return value in ({}, []) or (key in ADDED_KEYS and value == ADDED_KEYS[key])


def check_config_change(run_dir: Path, config_dict: dict[str, Any], mutable_keys: Iterable[str]) -> None:
    """Refuse changed keys outside ``mutable_keys`` between the saved ``config.yaml`` and ``config_dict``."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise RunError(f"'{saved_path}' is not valid YAML; restore it or start a new run_dir") from None
    # A key the saved config lacks, now at an empty value ({} or []), is an option added by a newer lmforge
    # at its "off" default (e.g. train.param_lr): the saved run ran without it, so it is no change.
    # The same holds for the keys in ADDED_KEYS at their old behaviour's value.
    changed = [k for k in diff_configs(saved, config_dict) if not _is_mutable(k, mutable_keys)
               and not (_lookup(saved, k) == "<unset>" and _added_at_old_behaviour(k, _lookup(config_dict, k)))]
    if changed:
        detail = ", ".join(f"{k} ({_lookup(saved, k)!r} -> {_lookup(config_dict, k)!r})" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise RunError(f"cannot resume run dir '{run_dir}': config changed since the run started: {detail}{more}; "
                       f"only {', '.join(sorted(mutable_keys))} may change on resume — undo the change or "
                       f"choose a new run_dir")


def check_run_dir(run_dir: str | Path, resume: Any = "auto") -> bool:
    """The checks of :func:`prepare_run_dir` that write nothing but a probe file: call it before expensive
    work (tokenizer training, sharding) so a bad ``run_dir``/``resume`` fails in seconds.  Returns whether
    the run will resume from a checkpoint."""
    run_dir = Path(run_dir)
    resume = normalize_resume(resume)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"run dir '{run_dir}' is a file, not a directory; choose another run_dir")
    _ensure_writable(run_dir)
    if resume == "false" and has_run(run_dir):
        raise RunError(f"run dir '{run_dir}' already exists; pass resume=true to continue it or choose a new run_dir")
    ckpt = last_good_checkpoint(run_dir) if resume != "false" else None
    if resume == "true" and ckpt is None:
        found = list_checkpoints(run_dir)
        why = f" (the latest, {found[-1][1].name}, is bad: {verify_checkpoint(found[-1][1])})" if found else ""
        raise RunError(f"resume=true but run dir '{run_dir}' has no complete checkpoint to resume from{why}; "
                       f"pass resume=auto to start it over or choose a new run_dir")
    return ckpt is not None


def prepare_run_dir(run_dir: str | Path, config_dict: dict[str, Any], resume: Any = "auto",
                    mutable_keys: Iterable[str] = DEFAULT_MUTABLE_KEYS) -> bool:
    """Create/validate ``run_dir`` for a run with ``config_dict``; return whether it resumes."""
    run_dir = Path(run_dir)
    resuming = check_run_dir(run_dir, resume)
    existing = has_run(run_dir)
    if existing:
        check_config_change(run_dir, config_dict, mutable_keys)
    if existing and not resuming:  # auto, nothing to resume: start over (old metrics would mislead)
        cut_metrics(run_dir / METRICS_FILE, 0)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
    atomic_write_text(run_dir / CONFIG_FILE, dump_yaml(config_dict))
    return resuming


def metrics_at(path: str | Path, step: int) -> dict[str, Any] | None:
    """The first line of a metrics.jsonl logged at ``step``: the Trainer's (a recipe may add its own line for
    the last step, e.g. test scores), or None."""
    path = Path(path)
    if not path.exists():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step") == step:
            return rec
    return None


def cut_metrics(path: str | Path, step: int) -> None:
    """Keep only the lines of a metrics.jsonl with ``step <= step`` (dropping torn or unparsable lines)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))
