"""What a training run is told: :class:`TrainerConfig` (the ``train:`` section of every training config) and
the autocast dtype its ``precision`` resolves to on a device.  The loop that uses it is :mod:`lmforge.train.trainer`."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from lmforge.core.device import check_device_name
from lmforge.core.errors import ConfigError


@dataclass
class TrainerConfig:
    """The ``train:`` section of a run config.  ``max_steps``, ``seed``, ``run_dir`` and ``resume`` are
    top-level keys of the run config and are passed to :class:`Trainer` directly."""

    global_batch_size: int = 32
    """Examples (rows) per optimizer step."""
    micro_batch_size: Optional[int] = None
    """Rows per forward/backward; accumulation = global // micro.  None: no accumulation."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine, linear, wsd)."""
    warmup_steps: int = 0
    """Linear warmup from ~0 to ``lr`` over this many updates."""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """Decay after warmup; ``wsd`` = warmup, stable, then linear decay over the last ``decay_fraction``."""
    decay_fraction: float = 0.2
    """wsd only: fraction of ``max_steps`` spent decaying."""
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """adamw, or adafactor (Shazeer & Stern 2018; what T5 was pretrained with): factored second moments, no
    first moment, update clipping, and steps *relative* to each parameter's RMS, so ``lr`` is the relative step
    size (T5: 1e-2) and ``betas``/``eps``/``fused_adamw`` do not apply.  Single device and DDP only."""
    weight_decay: float = 0.1
    """Decoupled weight decay on >=2-D parameters (biases and norms never decay)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = off."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose global gradient norm is NaN or infinite is never applied.  ``stop`` (default) ends the run
    with an error naming the step and the last good checkpoint: a non-finite gradient usually means the run is
    diverging, and saying so at once costs nothing (resume with ``skip`` to step over a bad batch).  ``skip``
    drops that update and goes on (the step still counts: the LR schedule and the data position advance),
    recording it in ``skipped_steps``.  Under fp16 the GradScaler skips such steps itself (overflow is how it
    finds its scale), so fp16 runs always skip, within ``max_skipped_steps``."""
    max_skipped_steps: int = 25
    """The most consecutive skipped steps tolerated; one more stops the run (a run that only skips is stuck)."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    """Autocast dtype on CUDA (fp16 adds a GradScaler); auto = bf16 where supported, else fp32.  Other devices
    train in fp32.  Weights (and checkpoints) stay fp32 either way."""
    compile: bool = False
    """torch.compile the model's forward."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward (model.set_activation_checkpointing)."""
    log_every: int = 10
    """Write a metrics.jsonl line (and a progress line) every N steps and at the last step."""
    eval_every: int = 0
    """Run the evaluator every N steps (0 = only at the end); it always runs at the last step."""
    eval_max_batches: int = 20
    """Validation batches per evaluation (read by the recipe's evaluator)."""
    ckpt_every: int = 500
    """Checkpoint every N steps and at the last step; 0 = never checkpoint."""
    keep_last: int = 3
    """Keep the N newest checkpoints (plus the best by validation); 0 = keep all."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    fused_adamw: Literal["auto", "true", "false"] = "auto"
    """Fused AdamW kernel: auto = where the device has one."""
    param_lr: dict[str, float] = field(default_factory=dict)
    """Per-parameter learning rates, ``{pattern: lr}`` (fnmatch on parameter names; ``classifier`` matches
    ``classifier.weight`` and ``x.classifier.bias``): e.g. a task head that wants less than the delta's rate.
    Scheduled like ``lr``; the first matching pattern wins; one that matches nothing is an error."""
    freeze: list[str] = field(default_factory=list)
    """Parameters that stay as loaded (``requires_grad`` off before the optimizer is built), by the same patterns as
    ``param_lr``: e.g. ``[shared]`` keeps a T5's tied embedding / LM head, so the output rows of tokens the task
    never targets (a held-out entity's name) are not trained away.  A pattern that matches nothing is an error."""
    tensorboard: bool = True
    """Also write TensorBoard scalars under RUN_DIR/tb when tensorboard is installed."""

    def __post_init__(self) -> None:
        if self.global_batch_size < 1:
            raise ConfigError(f"train.global_batch_size must be >= 1, got {self.global_batch_size}")
        micro = self.micro_batch_size
        if micro is not None:
            if micro < 1:
                raise ConfigError(f"train.micro_batch_size must be >= 1, got {micro}")
            if self.global_batch_size % micro:
                fits = max(d for d in range(1, min(micro, self.global_batch_size) + 1) if self.global_batch_size % d == 0)
                raise ConfigError(
                    f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                    f"train.micro_batch_size={micro}; set train.micro_batch_size to a divisor of it (e.g. {fits})")
        # Every number torch's optimizer or the schedule would reject (or take and train to nonsense) fails here,
        # before a run dir is touched; non-finite values are refused for every float key by the config layer.
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr} (e.g. 3e-4)")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers, e.g. [0.9, 0.95]; got {self.betas}")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"train.betas[{i}] must be in [0, 1), got {beta} (e.g. train.betas=[0.9,0.95])")
        if self.eps < 0:
            raise ConfigError(f"train.eps must be >= 0, got {self.eps} (e.g. 1e-8)")
        for key in ("min_lr_ratio", "decay_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"train.{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("log_every",):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "ckpt_every", "keep_last", "warmup_steps", "eval_max_batches",
                    "max_skipped_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.optimizer not in ("adamw", "adafactor"):
            raise ConfigError(f"train.optimizer must be adamw or adafactor, got {self.optimizer!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite must be stop or skip, got {self.nonfinite!r}")
        check_device_name(self.device, "train.device")
        for key in ("grad_clip", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        for pattern, lr in self.param_lr.items():
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
                raise ConfigError(f"train.param_lr.{pattern} must be a learning rate > 0, got {lr!r}")

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.global_batch_size

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // self.micro


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32)."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            print(f"note: train.precision={precision} applies on CUDA only; training in fp32 on {device.type}",
                  file=sys.stderr)
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if precision == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision=bf16 but this GPU has no bf16 support; use train.precision=fp16 or auto")
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return None
