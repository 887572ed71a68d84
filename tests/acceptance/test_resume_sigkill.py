"""A run killed with SIGKILL mid-training and resumed with resume=true ends exactly where an uninterrupted
run ends: same final loss, byte-identical weights (CPU, same seed, same thread count)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

STEPS = 60
ARGS = ["model.n_layer=2", "model.d_model=96", "model.n_head=4", "model.vocab_size=1024", "model.max_seq_len=64",
        "data.seq_len=64", "data.world_bytes=1000000", "tokenizer.train_bytes=300000", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.log_every=5", "train.eval_every=20", "train.eval_max_batches=2",
        "train.ckpt_every=10", "train.warmup_steps=5", "model.dropout=0.1", f"max_steps={STEPS}"]
ENV = {"OMP_NUM_THREADS": "1"}  # any fixed count: both runs use the same


def _last_loss(run_dir: Path) -> float:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert rows[-1]["step"] == STEPS
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "metrics.jsonl must not repeat steps after a resume"
    return rows[-1]["loss"]


def test_sigkill_then_resume_is_exact(tmp_path):
    cfg = str(ROOT / "configs/tiny-gpt2.yaml")
    env = {**os.environ, **ENV}
    straight = tmp_path / "straight"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", cfg, f"run_dir={straight}", *ARGS],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]

    killed = tmp_path / "killed"
    victim = subprocess.Popen([sys.executable, "-m", "lmforge", "pretrain", cfg, f"run_dir={killed}", *ARGS],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once a mid-run checkpoint exists (and before the end): the state after it is lost work.
    deadline = time.time() + 600
    target = killed / "checkpoints" / "step_0000030" / "COMPLETE"
    while not target.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed; make it longer"
    time.sleep(0.5)  # let it get partway into the next steps
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "model").exists()

    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", cfg, f"run_dir={killed}", "resume=true", *ARGS],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _last_loss(killed) == _last_loss(straight)
    a = (straight / "model" / "model.safetensors").read_bytes()
    b = (killed / "model" / "model.safetensors").read_bytes()
    assert a == b, "weights after SIGKILL + resume differ from the uninterrupted run"
