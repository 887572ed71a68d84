"""A run killed with SIGKILL again and again — mid-step, while a checkpoint is written, as it is published, before
old ones are pruned, while the model is exported — and resumed each time ends exactly where an uninterrupted run
ends: same final loss, byte-identical weights (CPU, same seed, same thread count)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

STEPS = 60
ARGS = ["model.n_layer=2", "model.d_model=96", "model.n_head=4", "model.vocab_size=1024", "model.max_seq_len=64",
        "data.seq_len=64", "data.world_bytes=1000000", "tokenizer.train_bytes=300000", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.log_every=5", "train.eval_every=20", "train.eval_max_batches=2",
        "train.ckpt_every=10", "train.keep_last=2", "train.warmup_steps=5", "model.dropout=0.1", f"max_steps={STEPS}"]
ENV = {"OMP_NUM_THREADS": "1"}  # any fixed count: both runs use the same

# `python -c KILLER POINT pretrain ...`: the CLI with one writer wrapped so that the process SIGKILLs itself at
# POINT — deterministic points inside the writes, which a kill from outside would hit only by luck.
KILLER = """
import os, signal, sys
from pathlib import Path
point = sys.argv.pop(1)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
import torch
import lmforge.core.io as io
import lmforge.models.model_dir as model_dir
import lmforge.train.trainer as trainer
if point == "checkpoint-write":  # step 10's optimizer.pt written into the unpublished directory
    save = torch.save
    def killing_save(obj, f, *a, **k):
        save(obj, f, *a, **k)
        if ".step_0000010." in str(f) and Path(f).name == "optimizer.pt":
            die()
    torch.save = killing_save
elif point == "checkpoint-publish":  # step 20 renamed into place, its parent directory not yet fsynced
    fsync_dir = io.fsync_dir
    def killing_fsync_dir(p):
        if (Path(p) / "step_0000020").is_dir():
            die()
        fsync_dir(p)
    io.fsync_dir = killing_fsync_dir
elif point == "mid-step":  # step 33's gradients computed, its optimizer update not yet applied
    grads = trainer.Trainer.compute_gradients
    trainer.Trainer.compute_gradients = lambda self, *a, **k: (grads(self, *a, **k), self.step == 32 and die())[0]
elif point == "prune":  # step 40 saved, the older checkpoints about to be deleted
    prune = trainer.prune_checkpoints
    trainer.prune_checkpoints = lambda run_dir, keep: die() if trainer.latest_checkpoint(run_dir).name == \\
        "step_0000040" else prune(run_dir, keep)
elif point == "export":  # half of the model dir written
    save_file = model_dir.save_file
    model_dir.save_file = lambda *a, **k: (save_file(*a, **k), die())
from lmforge.apps.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _last_loss(run_dir: Path) -> float:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert rows[-1]["step"] == STEPS
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "metrics.jsonl must not repeat steps after a resume"
    return rows[-1]["loss"]


def _start(point: str, run_dir: Path, resume: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", KILLER, point, "pretrain", str(ROOT / "configs/tiny-gpt2.yaml"),
                             f"run_dir={run_dir}", f"resume={resume}", *ARGS], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _killed(proc: subprocess.Popen, point: str) -> None:
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == -signal.SIGKILL, f"{point}: exit {proc.returncode}, not killed: {err[-2000:]}"


def test_sigkill_at_five_points_then_resume_is_exact(tmp_path):
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    straight = tmp_path / "straight"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", str(ROOT / "configs/tiny-gpt2.yaml"),
                           f"run_dir={straight}", *ARGS], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]

    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    _killed(_start("checkpoint-write", killed, "false", env), "checkpoint-write")
    assert not (ckpts / "step_0000010").exists() and (killed / ".lock").is_file()  # stale, held by no one
    _killed(_start("checkpoint-publish", killed, "auto", env), "checkpoint-publish")
    assert (ckpts / "step_0000020" / "COMPLETE").is_file()

    _killed(_start("mid-step", killed, "auto", env), "mid-step")
    assert not (ckpts / "step_0000040").exists()

    _killed(_start("prune", killed, "auto", env), "prune")
    _killed(_start("export", killed, "auto", env), "export")
    assert (ckpts / f"step_{STEPS:07d}" / "COMPLETE").is_file() and not (killed / "model").exists()

    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", str(ROOT / "configs/tiny-gpt2.yaml"),
                           f"run_dir={killed}", "resume=true", *ARGS], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning:" not in proc.stderr  # every checkpoint a kill left behind verifies
    assert _last_loss(killed) == _last_loss(straight)
    a = (straight / "model" / "model.safetensors").read_bytes()
    b = (killed / "model" / "model.safetensors").read_bytes()
    assert a == b, "weights after SIGKILL + resume differ from the uninterrupted run"
