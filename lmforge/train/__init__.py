"""Training: the supervised Trainer, optimizer factory, LR schedules, checkpoints, run dirs, logging."""

from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from lmforge.train.optim import build_optimizer, param_groups
from lmforge.train.rundir import DEFAULT_MUTABLE_KEYS, prepare_run_dir
from lmforge.train.schedule import LRScheduler, build_scheduler, lr_factor
from lmforge.train.run import Evaluation, FitResult, RunSpec
from lmforge.train.trainer import Trainer, TrainerConfig

__all__ = [
    "DEFAULT_MUTABLE_KEYS", "Evaluation", "FitResult", "LRScheduler", "RunSpec", "Trainer", "TrainerConfig",
    "build_optimizer", "build_scheduler", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "lr_factor",
    "param_groups", "prepare_run_dir", "save_checkpoint",
]
