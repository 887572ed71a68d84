"""What a training run is given and what it gives back: :class:`RunSpec` (where it lives, how long it goes),
:class:`Evaluation` (validation and the best-checkpoint rule) and :class:`FitResult` (what ``Trainer.fit`` leaves
behind).  Kept apart from the loop so that loops other than the supervised Trainer (the RL loops to come) can take
and return the same things."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from torch import nn

from lmforge.core.config import require
from lmforge.core.errors import ConfigError
from lmforge.train.rundir import DEFAULT_MUTABLE_KEYS, normalize_resume

__all__ = ["Evaluation", "FitResult", "RunSpec", "check_run_keys"]


def check_run_keys(cfg: Any) -> None:
    """The top-level keys every run config has (``max_steps``, ``seed``), checked when the config is read (its
    ``__post_init__``), so a bad value fails before a run dir is touched."""
    require(cfg.max_steps >= 0, "max_steps", cfg.max_steps, ">= 0")
    require(cfg.seed >= 0, "seed", cfg.seed, ">= 0")


@dataclass
class RunSpec:
    """Where a run lives and how long it goes: the run config's top-level keys.

    ``config_dict`` is the whole resolved run config, saved as ``RUN_DIR/config.yaml`` and compared on resume
    (None: the top-level keys and ``train``); ``mutable_keys`` are the config keys allowed to change on resume
    (see lmforge/train/rundir.py)."""

    run_dir: str | Path
    max_steps: int
    seed: int = 0
    resume: Any = "auto"
    config_dict: dict[str, Any] | None = None
    mutable_keys: Iterable[str] = DEFAULT_MUTABLE_KEYS

    def __post_init__(self) -> None:
        if not isinstance(self.max_steps, int) or self.max_steps < 0:
            raise ConfigError(f"max_steps must be a non-negative integer, got {self.max_steps!r}")
        self.run_dir = Path(self.run_dir)
        self.resume = normalize_resume(self.resume)


@dataclass
class Evaluation:
    """Validation and the best-checkpoint rule.

    ``evaluator(model) -> {"val_loss": ..., ...}`` is called in eval mode under ``no_grad`` (and autocast) every
    ``train.eval_every`` steps and at the end; the Trainer saves and restores the RNG states around it, so
    evaluation never perturbs training (None: no validation).  ``select_metric`` / ``select_mode`` pick the best
    checkpoint (``val_loss``, lower is better, by default; fine-tuning selects e.g. ``val_accuracy`` with
    ``max``).  ``restore_best``: ``fit()`` ends by loading the best checkpoint's weights into the model (fine-tuning
    scores and saves the selected model); off, the model keeps its final weights (pretraining exports those)."""

    evaluator: Callable[[nn.Module], dict[str, float]] | None = None
    select_metric: str = "val_loss"
    select_mode: Literal["min", "max"] = "min"
    restore_best: bool = False

    def __post_init__(self) -> None:
        if self.select_mode not in ("min", "max"):
            raise ValueError(f"select_mode must be 'min' or 'max', got {self.select_mode!r}")


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` leaves behind.

    ``final``: the last metrics line (what ``metrics.jsonl`` ends with); ``best``: the line of the evaluation that
    set the best ``select_metric``, and ``best_step`` its step (None without one).  ``metrics_file``,
    ``last_checkpoint`` and ``best_checkpoint`` are the paths written (a checkpoint None when none was saved:
    ``train.ckpt_every=0``); ``restored_best``: the model now holds ``best_checkpoint``'s weights."""

    final: dict[str, Any]
    best: dict[str, Any] | None
    best_step: int | None
    run_dir: Path
    metrics_file: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    restored_best: bool = False
