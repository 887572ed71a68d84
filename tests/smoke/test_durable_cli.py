"""Nothing lost, through the CLI: a second start into a live run dir is refused at once (also under torchrun) and
the first run completes; a full disk while a checkpoint or the exported model is written is one line, loses
nothing, and the resume it advises ends byte-identical."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from lmforge.train.runlock import RunLock
from tests.conftest import ROOT, cli, run_cli
from tests.faults import assert_refused, assert_unchanged, hashes
from tests.smoke.test_cli import TINY
from tests.smoke.test_torchrun import torchrun_cli

CONFIG = str(ROOT / "configs/tiny-gpt2.yaml")
STEPS = 30

# The first run, slowed to 50 ms a step (the toy steps take a few ms): it stays live while the second starts.
_SLOW_RUN = """
import sys, time
import lmforge.train.trainer as trainer
step = trainer.Trainer.train_step
trainer.Trainer.train_step = lambda self, *a, **k: (time.sleep(0.05), step(self, *a, **k))[1]
from lmforge.apps.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_second_start_into_a_live_run_dir_is_refused_at_once(tmp_path):
    run_dir = tmp_path / "live"
    args = [CONFIG, f"run_dir={run_dir}", f"max_steps={STEPS}", *TINY, "train.log_every=1"]
    run_cli("--help")  # the zygote is up before the first run starts: the timings below are the refusal's
    first = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, "pretrain", *args], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-2000:]
        for resume in ("false", "true", "auto"):
            start = time.perf_counter()
            proc = run_cli("pretrain", *args, f"resume={resume}")
            took = time.perf_counter() - start
            assert_refused(proc, f"is in use by pid {first.pid}", str(run_dir))
            assert took < 1.0, f"resume={resume}: refused after {took:.2f}s"
        assert first.poll() is None, "the first run ended before every second start was tried"
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert (run_dir / "model" / "model.safetensors").is_file() and not (run_dir / ".lock").exists()


def test_torchrun_into_a_locked_run_dir_is_refused_before_the_process_group(tmp_path):
    """Rank 0 refuses before init_process_group; the other rank, still in the rendezvous, is stopped by torchrun
    instead of waiting in a collective."""
    run_dir = tmp_path / "locked"
    with RunLock(run_dir):
        start = time.perf_counter()
        proc = torchrun_cli(2, "pretrain", CONFIG, f"run_dir={run_dir}", "max_steps=4", *TINY,
                            "distributed.strategy=ddp", timeout=120)
        took = time.perf_counter() - start
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert f"is in use by pid {os.getpid()}" in errors[0] and "[rank 0/2]" in errors[0]
    assert "/lmforge/" not in proc.stderr  # torchrun's own summary only, no traceback from lmforge
    assert took < 60, f"the refused job took {took:.0f}s to end"
    assert sorted(p.name for p in run_dir.iterdir()) == []  # nothing was written


class ExportDiskFull:
    """The export's write of ``name`` (model dir) fails as a full disk does; ``before``: sha256 of the run dir's
    files at that moment, outside the directory being written."""

    def __init__(self, monkeypatch, name: str, run_dir: pathlib.Path) -> None:
        import lmforge.core.io as io
        import lmforge.models.model_dir as model_dir

        self.name, self.run_dir, self.before = name, run_dir, None
        save_file, write_text, fsync = model_dir.save_file, pathlib.Path.write_text, io.fsync_file
        monkeypatch.setattr(model_dir, "save_file", lambda t, f, *a, **k: self._hit(f) or save_file(t, f, *a, **k))
        monkeypatch.setattr(pathlib.Path, "write_text", lambda p, *a, **k: self._hit(p) or write_text(p, *a, **k))
        monkeypatch.setattr(io, "fsync_file", lambda p: self._hit(p, fsync=True) or fsync(p))

    def _hit(self, file, fsync: bool = False) -> None:
        file = pathlib.Path(file)
        wanted = fsync if self.name == "fsync" else not fsync and (
            file.name == self.name or file.name.startswith(f".{self.name}."))
        if self.before is not None or not wanted or ".model." not in str(file):  # the model dir's temporary name
            return
        self.before = {p: h for p, h in hashes(self.run_dir).items() if ".tmp" not in p and not p.endswith(".lock")}
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("durable") / "straight"
    proc = cli("pretrain", CONFIG, f"run_dir={run_dir}", "max_steps=8", *TINY, "train.ckpt_every=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _weights(run_dir: pathlib.Path) -> bytes:
    return (run_dir / "model" / "model.safetensors").read_bytes()


def test_disk_full_at_a_checkpoint_then_resume(straight, tmp_path, monkeypatch):
    import torch

    run_dir = tmp_path / "full"
    save, seen = torch.save, {}

    def full_at_step_8(obj, f, *a, **k):  # torch.save's own words for a full disk, at step 8's optimizer.pt
        if ".step_0000008." in str(f) and pathlib.Path(f).name == "optimizer.pt" and not seen:
            seen.update(hashes(run_dir))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_at_step_8)
    args = [CONFIG, f"run_dir={run_dir}", "max_steps=8", *TINY, "train.ckpt_every=4"]
    proc = cli("pretrain", *args)
    monkeypatch.undo()
    line = assert_refused(proc, f"No space left on device: '{run_dir}/checkpoints/step_0000008/optimizer.pt'",
                          "resume=true")
    assert_unchanged({p: h for p, h in seen.items() if not p.endswith(".lock") and ".tmp" not in p})
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000004"], line
    assert not (run_dir / "model").exists()
    proc = cli("pretrain", *args, "resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _weights(run_dir) == _weights(straight)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                  "lmforge.json", "fsync"])
def test_disk_full_at_each_export_file_then_resume(straight, tmp_path, monkeypatch, name):
    """The finished run re-exports on resume: a full disk at each file of the model dir leaves the model dir it
    had as it was (and no temporary one), and the resume after it writes the same bytes again."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    args = [CONFIG, f"run_dir={run_dir}", "max_steps=8", *TINY, "train.ckpt_every=4", "resume=true"]
    full = ExportDiskFull(monkeypatch, name, run_dir)
    proc = cli("pretrain", *args)
    monkeypatch.undo()
    shown = f"{run_dir}/model" + ("" if name == "fsync" else f"/{name}'")  # fsync: whichever file it was
    assert_refused(proc, f"No space left on device: '{shown}", "resume=true")
    assert full.before is not None and any("/model/" in p for p in full.before)
    assert_unchanged(full.before)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".model.")]
    proc = cli("pretrain", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _weights(run_dir) == _weights(straight)
