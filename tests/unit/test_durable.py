"""Nothing lost: checkpoint manifests and verification, the fallback past a bad latest checkpoint, retention that
keeps the last good one, a full disk at every file a checkpoint writes, fsync, and the run-dir lock."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lmforge.core.io as io
import lmforge.train.checkpoint as checkpoint
from lmforge.core.errors import RunError, user_error
from lmforge.train.checkpoint import (MANIFEST, last_good_checkpoint, list_checkpoints, prune_checkpoints, read_best,
                                      resume_checkpoint, verify_checkpoint)
from lmforge.train.runlock import LOCK_FILE, RunLock
from tests.faults import assert_unchanged, hashes
from tests.unit.toy_training import PlainCLM, ToySource, make_cfg, make_trainer, seeded_model

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
FILES = ["model.safetensors", "optimizer.pt", "state.pt", "trainer_state.json", MANIFEST]


def _evaluator(model):  # a new best at every evaluation: best.json names the newest checkpoint
    _evaluator.calls = getattr(_evaluator, "calls", 0) + 1
    return {"val_loss": 1.0 / _evaluator.calls}


def _train(run_dir, fail_at=None, evaluator=None):
    """The toy run of STEPS steps, checkpoints every 2; ``fail_at``: killed when step ``fail_at`` starts."""
    objective = PlainCLM()
    trainer = make_trainer(run_dir.parent, run_dir.name, model=seeded_model(0.1), max_steps=STEPS, objective=objective,
                           source=ToySource(objective, fail_at=fail_at), evaluator=evaluator,
                           cfg=make_cfg(ckpt_every=2, eval_every=2 if evaluator else 0, schedule="cosine"))
    trainer.fit()
    return trainer


def _final_weights(run_dir) -> dict[str, bytes]:
    """The last checkpoint's tensors, as bytes (the file's header orders its metadata as it likes)."""
    file = run_dir / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"
    return {k: v.numpy().tobytes() for k, v in load_file(file).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run and one killed while step 7 ran (checkpoints 2, 4, 6 written)."""
    root = tmp_path_factory.mktemp("durable")
    _train(root / "straight")
    with pytest.raises(KeyboardInterrupt):
        _train(root / "killed", fail_at=7)
    assert [s for s, _ in list_checkpoints(root / "killed")] == [2, 4, 6]
    return root


def _copy(runs, tmp_path, name="run"):
    shutil.copytree(runs / "killed", tmp_path / name)
    return tmp_path / name


def _damage(file: pathlib.Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "flipped":  # one byte in the middle: same size, wrong content
        file.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x5A]) + data[len(data) // 2 + 1:])
    else:
        file.unlink()


def test_manifest_lists_every_file_with_size_and_sha256(runs):
    ckpt = runs / "killed" / "checkpoints" / "step_0000006"
    listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(FILES[:-1])
    for name, entry in listed.items():
        assert entry["size"] == (ckpt / name).stat().st_size
        assert len(entry["sha256"]) == 64
    assert verify_checkpoint(ckpt) is None


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing"])
@pytest.mark.parametrize("name", FILES)
def test_a_bad_file_in_the_latest_checkpoint_falls_back_to_the_previous(runs, tmp_path, capsys, name, how):
    """Each file of the newest checkpoint damaged in turn: the resume says so in one line, sets the bad one aside,
    continues from step 4 and ends byte-identical to the uninterrupted run."""
    run = _copy(runs, tmp_path)
    _damage(run / "checkpoints" / "step_0000006" / name, how)
    assert last_good_checkpoint(run).name == "step_0000004"  # what the non-finite error names
    capsys.readouterr()
    trainer = _train(run)
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "step_0000006 is bad" in warnings[0] and name in warnings[0], err
    assert "resuming from step_0000004" in warnings[0]
    assert (run / "checkpoints" / "step_0000006.bad").is_dir()  # kept for inspection, no longer a checkpoint
    assert trainer.step == STEPS
    assert _final_weights(run) == _final_weights(runs / "straight")


def test_a_checkpoint_without_its_complete_marker_is_skipped_silently(runs, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    (run / "checkpoints" / "step_0000006" / "COMPLETE").unlink()  # a save cut short: never a checkpoint
    _train(run)
    assert "warning:" not in capsys.readouterr().err
    assert _final_weights(run) == _final_weights(runs / "straight")


@pytest.mark.parametrize("name,how,bad", [
    (None, None, False),  # an intact checkpoint an older lmforge wrote is accepted
    ("model.safetensors", "truncated", True),  # shorter than its header says
    ("optimizer.pt", "flipped", True),  # the archive's CRC-32
    ("state.pt", "truncated", True),  # no central directory
    ("trainer_state.json", "truncated", True),  # not JSON
])
def test_checkpoints_without_a_manifest_are_checked_for_what_can_be(runs, tmp_path, name, how, bad):
    run = _copy(runs, tmp_path)
    for _, ckpt in list_checkpoints(run):
        (ckpt / MANIFEST).unlink()
        (ckpt / "COMPLETE").write_text("ok\n")  # as an older lmforge wrote it
    if name:
        _damage(run / "checkpoints" / "step_0000006" / name, how)
    problem = verify_checkpoint(run / "checkpoints" / "step_0000006")
    assert (problem is not None) == bad and (not bad or name in problem), problem
    assert resume_checkpoint(run, say=lambda line: None).name == ("step_0000004" if bad else "step_0000006")
    _train(run)
    assert _final_weights(run) == _final_weights(runs / "straight")


def test_fallback_rewinds_best_json_and_all_bad_starts_over(tmp_path, capsys):
    run = tmp_path / "best"
    with pytest.raises(KeyboardInterrupt):
        _train(run, fail_at=7, evaluator=_evaluator)
    assert read_best(run)["step"] == 6
    _damage(run / "checkpoints" / "step_0000006" / "optimizer.pt", "truncated")
    lines = []
    assert resume_checkpoint(run, say=lines.append).name == "step_0000004"
    assert read_best(run)["step"] == 4 and len(lines) == 1  # the best step 4 knew, not the set-aside one
    for _, ckpt in list_checkpoints(run):
        _damage(ckpt / "state.pt", "flipped")
    with pytest.raises(RunError, match="no complete checkpoint to resume from .*step_0000004, is bad: state.pt"):
        from lmforge.train.rundir import check_run_dir
        check_run_dir(run, "true")
    assert resume_checkpoint(run, say=lines.append) is None and "starting from step 0" in lines[-1]
    assert read_best(run) is None and list_checkpoints(run) == []


def test_retention_keeps_the_last_good_checkpoint_while_a_newer_one_is_bad(runs, tmp_path):
    run = _copy(runs, tmp_path)
    _damage(run / "checkpoints" / "step_0000006" / "model.safetensors", "truncated")
    prune_checkpoints(run, keep_last=1)
    assert [s for s, _ in list_checkpoints(run)] == [4, 6]
    prune_checkpoints(_copy(runs, tmp_path, "intact"), keep_last=1)
    assert [s for s, _ in list_checkpoints(tmp_path / "intact")] == [6]


# ---- a full disk at each file a checkpoint writes --------------------------------------------------------


TARGET = f"step_{STEPS:07d}"  # the checkpoint the resumed copy of the killed run writes


class DiskFills:
    """The write of the file called ``name`` fails as a full disk makes it fail: part of it reaches the disk,
    then the writer's own error (torch.save's zip writer: "unexpected pos"; the others: OSError ENOSPC).
    ``before``: sha256 of every file under ``root`` at that moment, outside the directory being written."""

    def __init__(self, monkeypatch, name: str, root: pathlib.Path) -> None:
        self.name, self.root, self.before = name, root, None
        torch_save, st_save, write_text, fsync = torch.save, checkpoint.save_safetensors, pathlib.Path.write_text, \
            io.fsync_file
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: self._hit(
            f, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")) or torch_save(
            obj, f, *a, **k))
        monkeypatch.setattr(checkpoint, "save_safetensors", lambda m, f, *a, **k: self._hit(f) or st_save(m, f, *a, **k))
        monkeypatch.setattr(pathlib.Path, "write_text", lambda p, *a, **k: self._hit(p) or write_text(p, *a, **k))
        monkeypatch.setattr(io, "fsync_file", lambda p: self._hit(p, fsync=True) or fsync(p))

    def _hit(self, file, error: Exception | None = None, fsync: bool = False) -> None:
        file = pathlib.Path(file)
        wanted = fsync if self.name == "fsync" else not fsync and file.name == self.name
        if self.before is not None or not wanted or f".{TARGET}." not in str(file):  # once, in that checkpoint
            return
        self.before = {p: h for p, h in hashes(self.root).items() if ".tmp" not in p and not p.endswith(LOCK_FILE)}
        if not fsync:
            file.write_bytes(b"\0" * 100)  # what reached the disk before it filled
        raise error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("name", [*FILES, "COMPLETE", "fsync"])
def test_disk_full_at_each_checkpoint_file(runs, tmp_path, monkeypatch, name):
    """One-line error naming the file; every file that existed is unchanged, no half-written checkpoint looks
    complete; after space is freed the resume ends byte-identical to the uninterrupted run."""
    run = _copy(runs, tmp_path)
    full = DiskFills(monkeypatch, name, run)
    with pytest.raises(OSError) as e:
        _train(run)
    monkeypatch.undo()
    msg = str(user_error(e.value, training=True))  # what the CLI prints after "error: "
    shown = TARGET if name == "fsync" else f"{TARGET}/{name}"
    assert msg.startswith("No space left on device: '") and shown in msg and "\n" not in msg, msg
    assert "resume=true" in msg
    assert ".tmp" not in msg  # the published name, not the temporary one
    assert_unchanged(full.before)
    assert [s for s, _ in list_checkpoints(run)] == [2, 4, 6]  # step 8 is not there, complete or not
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    _train(run)
    assert _final_weights(run) == _final_weights(runs / "straight")


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_dir_after(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(io, "fsync_file", lambda p: calls.append(("file", pathlib.Path(p).name)))
    monkeypatch.setattr(io, "fsync_dir", lambda p: calls.append(("dir", pathlib.Path(p).name)))
    replace = os.replace
    monkeypatch.setattr(io.os, "replace", lambda a, b: calls.append(("rename", pathlib.Path(b).name)) or replace(a, b))
    io.atomic_write_text(tmp_path / "a.txt", "x")
    assert [c[0] for c in calls] == ["file", "rename", "dir"] and calls[-1] == ("dir", tmp_path.name)
    calls.clear()
    with io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("y")
    kinds = [c[0] for c in calls]
    assert kinds == ["file", "dir", "dir", "rename", "dir"] and calls[-1] == ("dir", tmp_path.name), calls


def test_replace_dir_puts_the_old_directory_back_when_the_rename_fails(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("old")
    before = hashes(tmp_path / "d")
    replace = os.replace

    def failing(a, b):
        if pathlib.Path(a).name.endswith(".tmp"):  # the new one; putting the old one back works
            raise OSError(errno.EIO, "I/O error")
        replace(a, b)
    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(OSError), io.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "new").write_text("new")
    assert_unchanged(before)


# ---- the run-dir lock ------------------------------------------------------------------------------------

# runlock.py loaded by its path: without lmforge.train's __init__ (torch), a second process starts in a blink
_LOAD = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('runlock', sys.argv[2]); "
         "runlock = importlib.util.module_from_spec(spec); spec.loader.exec_module(runlock)\n")
_SECOND = _LOAD + """
try:
    runlock.RunLock(sys.argv[1])
except Exception as e:
    print(e)
    sys.exit(2)
print("locked")
"""


ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _second_process(run_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SECOND, str(run_dir), str(ROOT / "lmforge/train/runlock.py")],
                          capture_output=True, text=True, timeout=120, env=ENV)


def test_run_lock_is_one_process_reentrant_and_names_the_holder(tmp_path):
    run = tmp_path / "run"
    outer = RunLock(run)
    inner = RunLock(run)  # the recipe, then the Trainer inside it: one flock
    inner.release()
    proc = _second_process(run)
    assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stdout and "in use" in proc.stdout, proc
    outer.release()
    assert not (run / LOCK_FILE).exists()  # a clean release leaves nothing behind
    assert _second_process(run).stdout.strip() == "locked"


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _LOAD + "import time; held = runlock.RunLock(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(600)", str(run),
                               str(ROOT / "lmforge/train/runlock.py")], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"in use by pid {holder.pid}"):
            RunLock(run)
    finally:
        holder.kill()
        holder.wait()
    assert (run / LOCK_FILE).exists()  # the stale file stays, unlocked
    with RunLock(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
