"""`lmforge grpo` / `lmforge ppo` killed with SIGKILL mid-step, between two updates on the same batch of rollouts,
then resumed, end with weights byte-identical to an uninterrupted run: the checkpoint keeps the rollout buffer, the
prompt position, the sampling RNG and (PPO) the adaptive KL coefficient (CPU, same seed, one thread)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.rl_data import write_prompts
from tests.sft_models import tiny_model_dir

STEPS = 8
COMMON = ["rollout.max_new_tokens=6", "rollout.num_generations=4", "train.global_batch_size=8",
          f"max_steps={STEPS}", "train.ckpt_every=2", "train.keep_last=2", "train.eval_every=4", "train.lr=1e-3",
          "train.device=cpu", "train.tensorboard=false",
          'rewards=[{kind: function, function: "tests.rl_rewards:digits"}, {kind: verifier}]']
ALGOS = {"grpo": ["grpo.num_iterations=3", "grpo.beta=0.05"],  # updates 1-3, 4-6, 7-9 on one batch each
         "ppo": ["ppo.num_ppo_epochs=2", "ppo.num_mini_batches=2", "ppo.target_kl=0.5", "ppo.kl_coef=0.1"]}

# `python -c KILLER grpo ...`: the CLI, SIGKILLed by itself once step 5's gradients are computed (before the update)
KILLER = """
import os, signal, sys
import lmforge.train.trainer as trainer
grads = trainer.Trainer.compute_gradients
def dying(self, *a, **k):
    out = grads(self, *a, **k)
    if self.step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
trainer.Trainer.compute_gradients = dying
from lmforge.apps.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_sigkill_mid_run_then_resume_gives_byte_identical_weights(tmp_path, algo):
    model = tiny_model_dir(tmp_path / "policy")
    prompts, held = write_prompts(tmp_path / "p.jsonl"), write_prompts(tmp_path / "e.jsonl", 4, 100)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [f"model={model}", f"data.train={prompts}", f"data.eval={held}", *COMMON, *ALGOS[algo]]

    def run(*extra: str, killer: bool = False) -> subprocess.CompletedProcess:
        head = [sys.executable, "-c", KILLER] if killer else [sys.executable, "-m", "lmforge"]
        return subprocess.run([*head, algo, *args, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)

    straight = run(f"run_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run(f"run_dir={tmp_path / 'killed'}", killer=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "step_0000004" / "COMPLETE").is_file()
    assert not (tmp_path / "killed" / "model").exists()
    resumed = run(f"run_dir={tmp_path / 'killed'}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    a = (tmp_path / "straight" / "model" / "model.safetensors").read_bytes()
    b = (tmp_path / "killed" / "model" / "model.safetensors").read_bytes()
    assert a == b, f"{algo}: weights after SIGKILL + resume differ from the uninterrupted run"
    start = Path(model / "model.safetensors").read_bytes()
    assert a != start  # it trained
    # the starting model's held-out scores, measured before the kill, are still in the resumed run's results
    straight_start = json.loads((tmp_path / "straight" / "results.json").read_text())["start"]
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["start"] == straight_start
    assert "eval/accuracy" in straight_start
