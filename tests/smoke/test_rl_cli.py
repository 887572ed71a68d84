"""`lmforge grpo` / `lmforge ppo` end to end on a tiny chat model: TRL's metric names and the time split in
metrics.jsonl, samples in results.json, and each bad input as one `error:` line (exit 2, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli, run_cli
from tests.faults import assert_refused
from tests.rl_data import write_prompts
from tests.sft_models import tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["rollout.max_new_tokens=6", "rollout.num_generations=4", "train.global_batch_size=8", "train.device=cpu",
        "train.tensorboard=false", "train.ckpt_every=0"]
DIGITS = 'rewards=[{kind: function, function: "tests.rl_rewards:digits"}, {kind: verifier}]'


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rlcli")
    return {"model": tiny_model_dir(root / "policy"), "prompts": write_prompts(root / "p.jsonl", 8),
            "eval": write_prompts(root / "e.jsonl", 4, 100),
            "bare": write_prompts(root / "bare.jsonl", 4, fields=False), "root": root}


def _args(files, run: str, *extra: str) -> list[str]:
    return [f"model={files['model']}", f"run_dir={files['root'] / run}", f"data.train={files['prompts']}",
            f"data.eval={files['eval']}", *FAST, *extra]


@pytest.mark.parametrize("algo,names", [
    ("grpo", ["reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low_mean",
              "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length"]),
    ("ppo", ["objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
             "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
             "loss/value_avg", "val/num_eos_tokens", "rollout/logprob_gap"])])
def test_a_run_logs_trls_names_the_time_split_and_samples(files, algo, names):
    extra = ["grpo.beta=0.05", "grpo.num_iterations=2"] if algo == "grpo" else ["ppo.critic=separate",
                                                                                  "ppo.num_mini_batches=2"]
    proc = run_cli(algo, *_args(files, algo, "max_steps=4", "train.eval_every=2", DIGITS, *extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["algorithm"] == algo and summary["prompts"] == {"train": 8, "eval": 4, "prompts_too_long": 0}
    rows = [json.loads(x) for x in (files["root"] / algo / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for name in names + ["time/generate_s", "time/score_s", "time/update_s"]:
        assert all(name in r for r in rows), name
    assert all(r["rollout/logprob_gap"] < 1e-5 for r in rows)  # on-policy: rollout = recomputed log-probs
    assert "eval/accuracy" in rows[1] and "eval/accuracy" in summary["start"]
    results = json.loads((files["root"] / algo / "results.json").read_text())
    assert results["samples"]["held_out"] and results["samples"]["rollouts"]
    assert (files["root"] / algo / "model" / "model.safetensors").is_file()


def test_grpo_needs_more_than_one_answer_per_prompt(files):
    assert_refused(cli("grpo", *_args(files, "g1", "rollout.num_generations=1")),
                   "rollout.num_generations", "must be >= 2 for GRPO")


def test_a_prompt_file_without_the_verifier_fields_is_one_line(files):
    args = [a if not a.startswith("data.train=") else f"data.train={files['bare']}" for a in _args(files, "nv")]
    assert_refused(cli("grpo", *args), "bare.jsonl record 0: no 'answer' field", "verifier")


def test_a_raising_reward_function_is_named_with_its_prompt(files):
    proc = cli("grpo", *_args(files, "raise", "max_steps=1",
                              'rewards=[{kind: function, function: "tests.rl_rewards:raises"}]'))
    assert_refused(proc, "reward function tests.rl_rewards:raises raised KeyError", "on prompt 'What is")


def test_prompts_all_longer_than_the_limit_are_counted_in_one_line(files):
    assert_refused(cli("grpo", *_args(files, "long", "rollout.max_prompt_length=3")),
                   "all 8 prompts", "longer than rollout.max_prompt_length=3 tokens (8 too long)")
