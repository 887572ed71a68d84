"""RL on 2 gloo ranks: GRPO's ``dapo`` loss normalises over the whole global batch, so 2 ranks (each with its own
micro-batches) train to the weights of one process without accumulation; and `grpo` itself runs under DDP with
the prompts split and the rollouts gathered."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.rl_data import write_prompts
from tests.sft_models import tiny_model_dir

WORKER = ROOT / "tests" / "rl_dist_worker.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def _worker():
    spec = importlib.util.spec_from_file_location("rl_dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)


def test_dapo_on_two_ranks_with_accumulation_equals_one_process(tmp_path):
    """The gradient of one global batch: whole, as 4 micro-batches, and as 2 ranks x 2 micro-batches (DDP's
    all-reduce included) -- and the weights after 4 AdamW steps.  bnpo (a per-micro-batch token mean, as TRL's) does
    change with the split: the check can tell."""
    W = _worker()
    one = W.dapo_grads(tmp_path / "g1", None)
    accumulated = W.dapo_grads(tmp_path / "g2", 2)
    proc = torchrun("dapo", str(tmp_path / "two.pt"), "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for k in one:
        torch.testing.assert_close(accumulated[k], one[k], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(two["grads"][k], one[k], atol=1e-7, rtol=1e-5)
    bnpo_one, bnpo_acc = W.dapo_grads(tmp_path / "b1", None, loss_type="bnpo"), W.dapo_grads(tmp_path / "b2", 2, loss_type="bnpo")
    assert max(float((bnpo_acc[k] - bnpo_one[k]).abs().max()) for k in one) > 1e-4
    weights = W.dapo_run(tmp_path / "w1", None)
    for k in weights:  # AdamW's normalised steps amplify last-bit differences of near-zero gradients: a looser bound
        assert float((two["weights"][k] - weights[k]).norm() / weights[k].norm().clamp(min=1e-12)) < 1e-3


def test_grpo_recipe_runs_on_two_ranks_with_prompts_split(tmp_path):
    policy = tiny_model_dir(tmp_path / "policy")
    prompts = write_prompts(tmp_path / "p.jsonl", 8)
    proc = torchrun("grpo", str(tmp_path / "run"), str(policy), str(prompts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    assert all(r["reward_std"] > 0 for r in rows if "reward" in r)  # the rewards of both ranks' answers
    assert results["prompts"]["train"] == 8
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
