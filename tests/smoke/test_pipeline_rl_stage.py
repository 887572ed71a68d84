"""The pipeline's RL stage (lmforge/apps/stage_rl.py) against the SFT stage's contract: ``ctx.results["sft"]["model"]``
is the SFT model dir.  A small chat model made here stands in for it (the SFT stage is another issue's)."""

from __future__ import annotations

import json

import pytest

from lmforge.apps.pipeline import STAGES, load_pipeline_config
from lmforge.apps.report import Report
from lmforge.apps.stage import Context
from lmforge.apps.stage_rl import stage_rl
from tests.sft_models import tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["rl.max_steps=4", "rl.types=[count]", "rl.n_train=4", "rl.n_eval=4", "rl.global_batch_size=8",
         "rl.max_new_tokens=8", "rl.eval_every=2", "rl.lr=1e-3", "train.device=cpu", "train.tensorboard=false"]


def test_rl_stage_runs_grpo_from_the_sft_model_and_reports_curves_and_accuracy(tmp_path):
    sft = tiny_model_dir(tmp_path / "run" / "sft" / "model")
    cfg = load_pipeline_config(None, [f"run_dir={tmp_path / 'run'}", *SMALL])
    ctx = Context(cfg=cfg, report=Report(title="t"), run_dir=tmp_path / "run", results={"sft": {"model": str(sft)}})
    assert [s.name for s in STAGES][-1] == "rl"
    stage_rl(ctx)
    rl = tmp_path / "run" / "rl"
    assert (rl / "model" / "model.safetensors").is_file()
    for png in ("reward.png", "kl.png", "accuracy.png"):
        assert (rl / png).is_file() and (rl / png).with_suffix(".json").is_file()
    reward_curve = json.loads((rl / "reward.json").read_text())["reward"]
    assert [p[0] for p in reward_curve] == [1, 2, 3, 4]
    res = ctx.results["rl"]
    assert res["algorithm"] == "grpo" and 0.0 <= res["start"]["eval/accuracy"] <= 1.0
    assert "eval/accuracy" in res["last"]
    heading, body = ctx.report.sections[-1]
    assert heading == "RL" and "before (SFT model)" in body and "after 4 steps" in body and "rl/reward.png" in body


def test_rl_stage_without_an_sft_model_says_it_was_skipped(tmp_path):
    cfg = load_pipeline_config(None, [f"run_dir={tmp_path / 'run'}", *SMALL])
    ctx = Context(cfg=cfg, report=Report(title="t"), run_dir=tmp_path / "run")
    stage_rl(ctx)
    assert ctx.results["rl"] == {"skipped": "no SFT model (the SFT stage did not run)"}
    assert ctx.report.sections[-1] == ("RL", "Skipped: no SFT model (the SFT stage did not run).")
    assert not (tmp_path / "run" / "rl").exists()
