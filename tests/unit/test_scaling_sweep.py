"""`lmforge scaling sweep`'s grid: each run's steps spend its budget, and the grids it cannot use are one line."""

from __future__ import annotations

import pytest

from lmforge.core.errors import ConfigError
from lmforge.recipes.scaling_sweep import ScalingSweepConfig, plan

SIZES = [{"d_model": 16, "n_layer": 1, "n_head": 2}, {"d_model": 32, "n_layer": 2, "n_head": 2},
         {"d_model": 64, "n_layer": 2, "n_head": 4}]
BASE = ["model.vocab_size=256", "model.max_seq_len=32", "data.seq_len=32", "train.global_batch_size=4"]


def _cfg(tmp_path, **kw):
    return ScalingSweepConfig(run_dir=str(tmp_path / "sweep"), pretrain="configs/tiny-gpt2.yaml",
                              overrides=list(BASE), sizes=kw.pop("sizes", SIZES), **kw)


def test_each_run_spends_its_budget_and_is_iso_flop(tmp_path):
    runs = plan(_cfg(tmp_path, budgets=[2e10, 6e10], min_steps=5))
    assert len(runs) == 6
    for r in runs:
        spent = r.flops_per_token * r.tokens
        step = r.flops_per_token * 4 * 32
        assert r.budget - step < spent <= r.budget  # within one step of the budget, never over it
        assert f"max_steps={r.steps}" in r.overrides and r.tokens == r.steps * 4 * 32
        warmup = next(o for o in r.overrides if o.startswith("train.warmup_steps="))
        assert int(warmup.split("=")[1]) == max(1, round(0.05 * r.steps))  # the schedule scales with the run
    small = [r for r in runs if r.size == SIZES[0]]
    assert small[1].steps > 2.5 * small[0].steps  # 3x the budget: ~3x the tokens
    assert runs[0].n_non_embedding < runs[0].n_total


def test_a_budget_that_cannot_fit_the_smallest_model_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"budgets: 1e\+06 FLOPs cannot fit the smallest model \(d16-L1-h2") as e:
        plan(_cfg(tmp_path, budgets=[1e6, 2e10], min_steps=5))
    assert "\n" not in str(e.value)


def test_a_grid_with_fewer_than_three_sizes_per_budget_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="an IsoFLOP curve needs at least three model sizes"):
        plan(_cfg(tmp_path, budgets=[2e10], sizes=SIZES[:1]))
    # a budget that the larger sizes do not fit in min_steps keeps too few sizes: approach 2 needs three
    with pytest.raises(ConfigError, match=r"fits only 2 model size\(s\).*approach 2 needs three"):
        plan(_cfg(tmp_path, budgets=[3e8], min_steps=5))


def test_bad_keys_are_one_line():
    with pytest.raises(ConfigError, match="budgets"):
        ScalingSweepConfig(budgets=[])
    with pytest.raises(ConfigError, match=r"budgets\[0\]"):
        ScalingSweepConfig(budgets=[-1.0])
