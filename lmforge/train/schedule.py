"""Learning-rate schedules: linear warmup, then cosine / linear / WSD decay, or constant.

A schedule is a pure function of the update index ``step`` (0-based: ``step = 0`` is the first optimizer
update) that returns a factor in ``[0, 1]``; the learning rate of update ``step`` is ``lr * factor``.

- **warmup** (all schedules): ``factor = (step + 1) / warmup_steps`` for ``step < warmup_steps``, so the
  first update already moves (``lr / warmup_steps``) and update ``warmup_steps - 1`` uses the full ``lr``.
- **cosine**: from 1 down to ``min_lr_ratio`` along half a cosine over ``[warmup_steps, max_steps]``.
- **linear**: from 1 down to ``min_lr_ratio`` linearly over ``[warmup_steps, max_steps]``.
- **wsd** (warmup-stable-decay): 1 until the last ``decay_fraction`` of ``max_steps``, then linear down
  to ``min_lr_ratio``; the decay never starts before warmup ends.
- **constant**: 1 after warmup.

The factor reaches ``min_lr_ratio`` at ``step = max_steps`` and stays there beyond it (so a resumed run
with a larger ``max_steps`` continues along the *new* curve from where it is).

:class:`LRScheduler` applies the factor to an optimizer's parameter groups; its state is just the step
count, so rebuilding it with a changed ``max_steps`` and loading the saved state continues correctly.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from lmforge.core.errors import ConfigError

SCHEDULES = ("cosine", "linear", "wsd", "constant")


def lr_factor(step: int, *, schedule: str, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
              decay_fraction: float = 0.2) -> float:
    """The learning-rate multiplier of update ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_start = max(warmup_steps, max_steps - int(round(decay_fraction * max_steps)))
    elif schedule in ("cosine", "linear"):
        decay_start = warmup_steps
    else:
        raise ConfigError(f"unknown schedule '{schedule}'; use one of {', '.join(SCHEDULES)}")
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear and the decay phase of wsd
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def make_lr_lambda(schedule: str, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                   decay_fraction: float = 0.2) -> Callable[[int], float]:
    """``step -> factor`` with the schedule's settings bound (checks them once, here)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule '{schedule}' is unknown; use one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction must be in [0, 1], got {decay_fraction}")

    def fn(step: int) -> float:
        return lr_factor(step, schedule=schedule, max_steps=max_steps, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction)

    return fn


class LRScheduler:
    """Sets ``group['lr'] = group['initial_lr'] * fn(step)`` on every parameter group.

    Call :meth:`step` after each ``optimizer.step()``.  Right after construction (and after
    :meth:`load_state_dict`) the groups hold the learning rate of the next update.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fn: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.fn = fn
        self.last_step = 0  # number of updates done
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._apply()

    def _apply(self) -> None:
        factor = self.fn(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The learning rates the next update will use (one per parameter group)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, max_steps: int) -> LRScheduler:
    """An :class:`LRScheduler` from a :class:`~lmforge.train.trainer.TrainerConfig`-like ``cfg``."""
    fn = make_lr_lambda(cfg.schedule, max_steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
                        decay_fraction=cfg.decay_fraction)
    return LRScheduler(optimizer, fn)
