"""Learning-rate schedules: values at known points, and the stateful scheduler's resume."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.train.schedule import LRScheduler, lr_factor, make_lr_lambda


def f(step, schedule, max_steps=110, warmup=10, min_ratio=0.1, decay_fraction=0.2):
    return lr_factor(step, schedule=schedule, max_steps=max_steps, warmup_steps=warmup, min_lr_ratio=min_ratio,
                     decay_fraction=decay_fraction)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear_from_zero(schedule):
    assert [f(s, schedule) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10, schedule) == pytest.approx(1.0)


def test_cosine_values():
    assert f(60, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert f(35, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110, "cosine") == pytest.approx(0.1)
    assert f(500, "cosine") == pytest.approx(0.1)  # stays at the floor past max_steps
    values = [f(s, "cosine") for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_values():
    assert f(60, "linear") == pytest.approx(0.55)
    assert f(85, "linear") == pytest.approx(0.1 + 0.9 * 0.25)
    assert f(110, "linear") == pytest.approx(0.1)


def test_wsd_values():
    # 110 steps, decay over the last 22: stable until step 88, then linear to the floor at 110
    assert f(50, "wsd") == 1.0 and f(88, "wsd") == 1.0
    assert f(99, "wsd") == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110, "wsd") == pytest.approx(0.1)
    # decay never starts before warmup ends
    assert lr_factor(3, schedule="wsd", max_steps=10, warmup_steps=4, decay_fraction=0.9) == pytest.approx(1.0)


def test_constant_and_no_warmup():
    assert f(100, "constant") == 1.0
    assert lr_factor(0, schedule="cosine", max_steps=100, warmup_steps=0) == 1.0


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="schedule"):
        make_lr_lambda("exp", 100)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        make_lr_lambda("cosine", 100, min_lr_ratio=2.0)


def test_scheduler_sets_lr_and_resumes_with_a_new_horizon():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = LRScheduler(opt, make_lr_lambda("cosine", 20, warmup_steps=5, min_lr_ratio=0.0))
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_factor(s, schedule="cosine", max_steps=20, warmup_steps=5) for s in range(8)])
    state = sched.state_dict()
    assert state == {"last_step": 8}

    opt2 = torch.optim.AdamW([p], lr=1.0)
    sched2 = LRScheduler(opt2, make_lr_lambda("cosine", 40, warmup_steps=5, min_lr_ratio=0.0))
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(
        lr_factor(8, schedule="cosine", max_steps=40, warmup_steps=5))
    assert sched2.get_last_lr() == [opt2.param_groups[0]["lr"]]
