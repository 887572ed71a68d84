"""The one supervised Trainer: batch -> loss -> optimizer step, for every supervised stage.

Each step::

    batch = train_source.next_batch(global_batch_size)      # dict of tensors, leading dim = global batch
    n     = objective.target_count(batch)                    # targets in the WHOLE global batch, up front
    for micro in split(batch, micro_batch_size):             # gradient accumulation
        out = objective.loss(model, micro)                   # ObjectiveOutput(loss_sum, count, metrics)
        (out.loss_sum / n).backward()
    clip -> optimizer.step() -> scheduler.step() -> zero_grad(set_to_none=True)

Dividing every micro-batch's *summed* loss by the target count of the whole global batch makes the
gradient independent of how the batch is split and of padding: accumulation 1x8, 4x2 and 8x1 give the
same gradient (averaging per micro-batch instead is the classic accumulation bug).

Per-step overhead is kept small: no host sync inside the micro-batch loop; losses, grad norms and the
non-finite check accumulate on the device and are read only at log / eval / checkpoint steps.

Non-finite steps.  The global gradient norm (after the all-reduce under DDP / ZeRO-1, a replicated DTensor under
FSDP: the same number on every rank, so every rank decides alike) is checked before every optimizer step, and a
step whose norm is NaN or infinite is never applied: no parameter moves, AdamW's moments and step counts stay as
they were.  The step still counts: ``step``, the LR schedule, the data position and ``tokens`` advance (so the
run's length and schedule do not depend on how many steps were skipped, and a resume replays the same batches).
``train.nonfinite=stop`` (default) then ends the run with a :class:`RunError` naming the step and the last good
checkpoint; ``skip`` goes on, stopping only after more than ``train.max_skipped_steps`` skips in a row.  The
decision stays on the device where the optimizer can take it there (fused AdamW's ``found_inf`` flag, as the
GradScaler uses it; a stopped run applies nothing after the bad step), so the error is raised at the next log /
eval / checkpoint step; other optimizers (foreach AdamW, Adafactor, ZeRO-1, FSDP) read one flag on the host per
step.  Under fp16 the GradScaler skips non-finite steps itself (its overflow skips find the loss scale), so fp16
runs count them as skipped steps whatever ``train.nonfinite`` says.  Skipped steps are counted in every
``metrics.jsonl`` line (``skipped_steps``) and listed in ``trainer_state.json`` (``nonfinite``).

A non-finite loss stops the run the same way.  Every checkpoint and exported model is checked before it is
written (weights and optimizer state all finite), so a bad state is never saved.

Step numbering: ``step`` counts completed optimizer steps (a skipped one included).  The ``metrics.jsonl`` line with
``step: 100`` describes the 100th update, and ``checkpoints/step_0000100`` holds the state after it.

The constructor takes the pieces (model, objective, batch source), the ``train:`` config and two groups:
:class:`RunSpec` (where the run lives and how long it goes) and :class:`Evaluation` (validation and the
best-checkpoint rule).  ``fit()`` returns a :class:`FitResult`: the final and best metrics and the paths it
wrote, with the best weights restored into the model when the evaluation asks for it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from lmforge.core.config import to_dict
from lmforge.core.device import resolve_device
from lmforge.core.errors import ConfigError, RunError
from lmforge.core.finite import nonfinite_flag
from lmforge.core.seed import rng_state, seed_everything, set_rng_state
from lmforge.eval.generate import generate
from lmforge.eval.sampling import GenerationConfig, GenerationResult
from lmforge.models.flops import device_peak_flops
from lmforge.objectives.base import count_input_tokens
from lmforge.train.checkpoint import (best_checkpoint, last_good_checkpoint, latest_checkpoint, list_checkpoints,
                                      load_checkpoint, load_model_weights, load_sharded_checkpoint, prune_checkpoints,
                                      resume_checkpoint, save_checkpoint, save_sharded_checkpoint, write_best)
from lmforge.train.logging import MetricsLogger, Progress
from lmforge.train.batching import batch_rows, split_batch, to_device
from lmforge.train.distributed import (Dist, LossModule, build_zero1_optimizer, gathered_for_generation, gathered_root,
                                       gradient_sync, rank_memory, wrap)
from lmforge.train.optim import build_optimizer, freeze_parameters, param_groups
from lmforge.train.rundir import METRICS_FILE, cut_metrics, metrics_at, prepare_run_dir
from lmforge.train.run import Evaluation, FitResult, RunSpec
from lmforge.train.runlock import RunLock
from lmforge.train.schedule import build_scheduler
from lmforge.train.trainer_config import TrainerConfig, resolve_precision

__all__ = ["StepStats", "Trainer", "TrainerConfig", "resolve_precision"]


@dataclass
class StepStats:
    """Device-side results of one global batch (read them only at log steps)."""

    loss_sum: torch.Tensor
    count: int
    tokens: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return self.loss_sum / max(self.count, 1)


class Trainer:
    """Trains ``model`` on ``objective`` over batches from ``train_source`` for ``run.max_steps`` updates.

    Args:
        model: the module to optimise (its trainable parameters); checkpointed whole.
        objective: ``loss(model, batch) -> ObjectiveOutput``, ``target_count(batch)``, optionally
            ``input_tokens(batch)`` and ``frozen_modules()`` (see lmforge/objectives/base.py).
        train_source: ``next_batch(n)``, ``state_dict()``, ``load_state_dict(state)``.
        cfg: :class:`TrainerConfig`.
        run: :class:`RunSpec` (run dir, max_steps, seed, resume, the config saved with the run).
        evaluation: :class:`Evaluation` (evaluator, best-checkpoint selection, restore the best); None: no
            validation, the best by ``val_loss``.
        dist: the :class:`Dist` of ``setup_distributed`` (None: one process).
        progress: None = progress bar on a terminal / plain lines otherwise; False = silent.
        flops_per_token: the model's training FLOPs per token, for ``mfu`` in the log lines (None: no ``mfu``).

    ``fit()`` seeds python/numpy/torch with ``run.seed`` before the first step of a fresh run (so dropout does
    not depend on how much RNG the model's construction used); a resumed run restores the saved RNG states.
    """

    def __init__(self, model: nn.Module, objective: Any, train_source: Any, cfg: TrainerConfig, run: RunSpec,
                 evaluation: Evaluation | None = None, *, dist: Dist | None = None, progress: bool | None = None,
                 flops_per_token: int | None = None) -> None:
        self.cfg = cfg
        freeze_parameters(model, cfg.freeze)  # before DDP/FSDP wrap and the optimizer see requires_grad
        self.objective = objective
        self.train_source = train_source
        self.run = run
        self.evaluation = evaluation or Evaluation()
        self.progress_enabled = progress
        self.config_dict = run.config_dict if run.config_dict is not None else {
            "run_dir": str(run.run_dir), "seed": run.seed, "max_steps": run.max_steps, "resume": run.resume,
            "train": to_dict(cfg)}
        self.dist = dist or Dist()
        self.rows_per_rank = self.dist.check_batch(cfg.global_batch_size, cfg.micro_batch_size)
        self.resuming = self._prepare_run_dir()
        self.flops_per_token = flops_per_token

        self.device = resolve_device(cfg.device)
        fsdp = self.dist.strategy == "fsdp"
        if fsdp:
            # Ranks other than 0 may pass a model built on the meta device: rank 0's weights reach every rank's
            # shards below, so no rank ever holds a second full copy on the device.
            meta = any(p.is_meta for p in model.parameters())
            if meta and self.dist.is_main:
                raise RunError("under distributed.strategy=fsdp rank 0 must hold the real weights (it broadcasts "
                               "them); build the model on the meta device on the other ranks only")
            full_weights = model.state_dict() if self.dist.is_main else {}
            self.model = model  # fully_shard moves each block's shard to the device, never the whole model
        else:
            self.model = model.to(self.device)
        if cfg.activation_checkpointing:
            if not hasattr(model, "set_activation_checkpointing"):
                raise ConfigError(f"train.activation_checkpointing=true but {type(model).__name__} does not support "
                                  f"it; set train.activation_checkpointing=false")
            model.set_activation_checkpointing(True)
        self._place_frozen_modules()
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        # the dtype the matmuls run in (MFU's peak): autocast's, else fsdp's bf16 parameters, else the weights'
        bf16_params = fsdp and self.dist.cfg.param_dtype == "bf16"
        self.compute_dtype = self.autocast_dtype or (torch.bfloat16 if bf16_params else next(
            (p.dtype for p in model.parameters()), torch.float32))
        # fsdp shards the model in place: rank 0 keeps an unsharded copy to export the final weights into.
        self._export_shell = copy.deepcopy(model).cpu() if self.dist.strategy == "fsdp" and self.dist.is_main else None
        self.loss_module = LossModule(model, objective)
        self.wrapped: nn.Module = wrap(self.loss_module, self.dist, self.device) if self.dist.enabled else self.loss_module
        if fsdp:
            if meta:
                model.to_empty(device=self.device)  # allocates this rank's shards only
            set_model_state_dict(model, full_weights, options=StateDictOptions(full_state_dict=True,
                                                                               broadcast_from_rank0=True))
            del full_weights
        self.optimizer = self._build_optimizer()
        self._impl_flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in self.optimizer.param_groups]
        self.scheduler = build_scheduler(self.optimizer, cfg, run.max_steps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # fp16: the GradScaler already skips non-finite steps (routinely, while it finds its scale)
        self.nonfinite = "skip" if self.scaler is not None else cfg.nonfinite
        self._skip_on_device = self._takes_found_inf()
        self.forward_model: nn.Module = torch.compile(model) if cfg.compile and not self.dist.enabled else model
        if cfg.compile and self.dist.enabled and self.dist.is_main:
            print(f"note: train.compile is not applied under distributed.strategy={self.dist.strategy} yet; training "
                  f"runs eagerly", file=sys.stderr)
        self.rank_memory: dict[str, int] = {}

        self.step = 0
        self.tokens = 0
        self.elapsed_before = 0.0
        self.best_value = math.inf if self.evaluation.select_mode == "min" else -math.inf
        self.best_step: int | None = None
        self.last_metrics: dict[str, Any] = {}
        self._fit_start = time.perf_counter()
        self._bad_step = torch.zeros((), dtype=torch.long, device=self.device)  # first non-finite step, 0 = none
        self._bad_value = torch.zeros((), dtype=torch.float32, device=self.device)
        self.skipped_steps: list[int] = []  # steps whose update was not applied (non-finite gradient norm)
        self._consecutive = 0  # skipped steps in a row, as of the last check
        self._run_on_device = torch.zeros((), dtype=torch.long, device=self.device)  # the same, step by step
        self._halt = torch.zeros((), dtype=torch.bool, device=self.device)  # stop: apply nothing from now on
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, non-finite?, norm) to read

    # ---- setup ------------------------------------------------------------------------------------

    def _prepare_run_dir(self) -> bool:
        """Rank 0 locks (until ``fit()`` ends; re-entrant with a recipe's lock), checks and writes the run dir;
        every rank learns the outcome (the same error on every rank)."""
        run = self.run
        self._run_lock = RunLock(run.run_dir, take=False)

        def prepare() -> bool:
            self._run_lock = RunLock(run.run_dir)
            try:
                return prepare_run_dir(run.run_dir, self.config_dict, run.resume, run.mutable_keys)
            except BaseException:
                self._run_lock.release()
                raise
        return bool(self.dist.on_main(prepare))

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg, strategy = self.cfg, self.dist.strategy
        if cfg.optimizer != "adamw" and strategy in ("zero1", "fsdp"):
            raise ConfigError(f"train.optimizer={cfg.optimizer} runs on one device or with distributed.strategy=ddp; "
                              f"strategy {strategy} shards AdamW state — use train.optimizer=adamw or strategy=ddp")
        if strategy == "zero1":
            groups = param_groups(self.model.named_parameters(), cfg.weight_decay, cfg.param_lr)
            if not groups:
                raise ConfigError(f"{type(self.model).__name__} has no trainable parameters; unfreeze some or apply "
                                  f"a delta method")
            fused = cfg.fused_adamw == "true" or (cfg.fused_adamw == "auto" and self.device.type == "cuda")
            return build_zero1_optimizer(groups, cfg.lr, cfg.betas, cfg.eps, fused)
        fused = cfg.fused_adamw
        if strategy == "fsdp" and (self.device.type != "cuda" or self.dist.cfg.cpu_offload) and fused == "auto":
            fused = "false"  # sharded (DTensor) parameters on the CPU: PyTorch's CPU fused kernel does not take them
        return build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, fused, cfg.param_lr,
                               kind=cfg.optimizer)

    def _takes_found_inf(self) -> bool:
        """Can the optimizer skip a step on a device flag (no host read)?  torch's fused Adam/AdamW kernels take
        ``found_inf`` (the GradScaler's mechanism; moments and step counts left as they were); ZeRO-1 and FSDP
        step other optimizers or DTensors, and the GradScaler passes its own flag."""
        opt = self.optimizer
        return (self.scaler is None and self.dist.strategy not in ("zero1", "fsdp")
                and isinstance(opt, torch.optim.Adam) and all(g.get("fused") for g in opt.param_groups))

    def _place_frozen_modules(self) -> None:
        frozen_fn = getattr(self.objective, "frozen_modules", None)
        frozen = dict(frozen_fn() or {}) if frozen_fn is not None else {}
        own = {id(p) for p in self.model.parameters()}
        for name, module in frozen.items():
            if any(id(p) in own for p in module.parameters()):
                raise ValueError(f"frozen module '{name}' shares parameters with the trained model; an objective's "
                                 f"frozen modules must be separate copies")
            module.to(self.device)
            module.eval()
            module.requires_grad_(False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ---- one step ---------------------------------------------------------------------------------

    def compute_gradients(self, batch: dict[str, Any], collect_metrics: bool = False) -> StepStats:
        """Forward/backward over ``batch`` in micro-batches, accumulating ``sum(loss_sum) / global count``
        gradients into ``.grad`` (no optimizer step, no zeroing)."""
        count = int(self.objective.target_count(batch))
        token_fn = getattr(self.objective, "input_tokens", None)
        tokens = int(token_fn(batch)) if token_fn is not None else count_input_tokens(batch)
        dist = self.dist
        batch = self._prepare_batch(batch)
        if dist.enabled:  # the count above is the global batch's; this rank trains on its slice of the rows
            batch = dist.shard_batch(batch, batch_rows(batch))
        batch = to_device(batch, self.device)
        denom = max(count, 1)
        loss_acc: torch.Tensor | None = None
        metrics: dict[str, torch.Tensor] = {}
        micros = split_batch(batch, self.cfg.micro)
        for i, micro in enumerate(micros):
            # Only the last micro-batch's backward all-reduces (DDP) / reduce-scatters (FSDP) the gradients.
            with gradient_sync(self.wrapped, dist, sync=i == len(micros) - 1):
                with self._autocast():
                    out = self.wrapped(micro) if dist.enabled else self.objective.loss(self.forward_model, micro)
                loss_sum = out.loss_sum
                if loss_sum.dtype in (torch.float16, torch.bfloat16):
                    loss_sum = loss_sum.float()
                scaled = loss_sum / denom
                if dist.grad_scale != 1.0:
                    scaled = scaled * dist.grad_scale  # the ranks' average becomes the sum of their shares
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            detached = loss_sum.detach()
            loss_acc = detached if loss_acc is None else loss_acc + detached
            if collect_metrics:
                for k, v in out.metrics.items():
                    v = v.detach().double() if torch.is_tensor(v) else torch.tensor(float(v), device=self.device)
                    metrics[k] = metrics[k] + v if k in metrics else v
        assert loss_acc is not None
        if collect_metrics and dist.enabled:  # global sums for the log line (only at log steps: one collective)
            loss_acc = dist.all_reduce(loss_acc.clone())
            for k in sorted(metrics):
                metrics[k] = dist.all_reduce(metrics[k].clone())
        return StepStats(loss_sum=loss_acc, count=count, tokens=tokens, metrics=metrics)

    def _prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The objective's once-per-optimizer-batch hook, ``prepare_batch(model, micro_batches, step_frac) -> dict``
        of new per-row entries: a loss whose targets depend on the whole optimizer batch (the weak-to-strong
        confidence loss's quantile) computes them here, over every micro-batch (no grad, eval mode: no dropout, no
        RNG drawn), before each micro-batch's forward/backward reads its rows.  ``step_frac`` is completed steps
        / ``max_steps``.  Under DDP/FSDP every rank runs it on the whole global batch, so all agree."""
        prepare = getattr(self.objective, "prepare_batch", None)
        if prepare is None:
            return batch
        batch = to_device(batch, self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                extra = prepare(self.forward_model, split_batch(batch, self.cfg.micro),
                                self.step / max(self.run.max_steps, 1))
        finally:
            self.model.train(was_training)
        return {**batch, **extra}

    def train_step(self, batch: dict[str, Any], collect: bool = False) -> tuple[StepStats, torch.Tensor | None, float]:
        """One optimizer update on a global batch; returns (stats, grad norm or None, lr used)."""
        stats = self.compute_gradients(batch, collect_metrics=collect)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # The norm is needed every step now (the skip decision), also without clipping: one more norm kernel.
        grad_norm = None
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if grad_norm is not None and hasattr(grad_norm, "full_tensor"):  # fsdp: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        skip = self._skip_flag(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self._apply_update(skip)
        self.scheduler.step()  # a skipped step still advances the schedule (see the module docstring)
        self.optimizer.zero_grad(set_to_none=True)
        # Remember the first non-finite loss on the device (read at the next log/eval/checkpoint step); under
        # skip, a step that was not applied does not count (its gradient was non-finite too).
        step_loss = stats.loss
        first_bad = (~torch.isfinite(step_loss)) & (self._bad_step == 0)
        if self.nonfinite == "skip":
            first_bad = first_bad & ~skip
        self._bad_step = torch.where(first_bad, self.step + 1, self._bad_step)
        self._bad_value = torch.where(first_bad, step_loss, self._bad_value)
        return stats, grad_norm, lr

    def _skip_flag(self, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """Device-side: is this step's update to be dropped?  Its norm is non-finite, or the run must stop (stop
        mode after a non-finite step, skip mode after too many in a row): nothing is applied until the next check
        raises."""
        if grad_norm is None:  # no gradient at all: nothing to apply or skip
            return self._halt
        bad = ~torch.isfinite(grad_norm)
        self._run_on_device = torch.where(bad, self._run_on_device + 1, 0)
        over = bad if self.nonfinite == "stop" else self._run_on_device > self.cfg.max_skipped_steps
        self._halt = self._halt | over
        self._pending.append((self.step + 1, bad, grad_norm.detach()))
        return bad | self._halt

    def _apply_update(self, skip: torch.Tensor) -> None:
        """``optimizer.step()`` unless ``skip`` (a 0-d bool tensor on the device)."""
        if self.scaler is not None:  # its own inf check skips the same steps (and lowers the scale)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self._skip_on_device:
            self.optimizer.found_inf = skip.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(skip):  # the one host read per step of optimizers without a device-side skip
            self.optimizer.step()

    def _read_skips(self) -> tuple[int, float, int] | None:
        """Read the steps since the last check (one host read): record the skipped ones, and return
        ``(step, norm, in a row)`` of the step that stops the run, or None."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        flags = torch.stack([bad for _, bad, _ in pending]).tolist()
        norms = torch.stack([norm.float() for _, _, norm in pending]).tolist()
        halt = None
        for (step, _, _), bad, norm in zip(pending, flags, norms):
            self._consecutive = self._consecutive + 1 if bad else 0
            if bad:
                self.skipped_steps.append(step)
                if halt is None and (self.nonfinite == "stop" or self._consecutive > self.cfg.max_skipped_steps):
                    halt = (step, norm, self._consecutive)
        return halt

    def _last_good(self) -> str:
        """Where the error sends the user: the newest checkpoint that verifies and whose weights are finite."""
        good = last_good_checkpoint(self.run.run_dir)
        return f"the last good checkpoint is {good}" if good is not None else "no good checkpoint was written yet"

    def _check_finite(self) -> None:
        halt = self._read_skips()  # the same on every rank: the norm it reads is global
        bad_step = int(self._bad_step)
        value = float(self._bad_value)
        if self.dist.enabled:  # every rank reaches this line at the same steps: all stop together, at the earliest
            never = torch.iinfo(torch.long).max
            first = self.dist.all_reduce(torch.where(self._bad_step > 0, self._bad_step, never), "min")
            bad_step = 0 if int(first) == never else int(first)
            if bad_step and int(self._bad_step) != bad_step:
                value = float("nan")  # another rank saw it
        fix = "lower train.lr or enable train.grad_clip" if self.cfg.grad_clip == 0 else \
            "lower train.lr or train.grad_clip"
        if bad_step and (halt is None or bad_step <= halt[0]):
            raise RunError(f"loss is {value} at step {bad_step}; {self._last_good()} — {fix}")
        if halt is None:
            return
        step, norm, in_a_row = halt
        if self.nonfinite == "stop":
            raise RunError(f"the gradient norm is {norm} at step {step} (the loss was finite); the step was not "
                           f"applied and {self._last_good()} — {fix}, or resume with train.nonfinite=skip to skip "
                           f"such steps")
        raise RunError(f"{in_a_row} steps in a row up to step {step} had a non-finite gradient norm, more than "
                       f"train.max_skipped_steps={self.cfg.max_skipped_steps}; none was applied and "
                       f"{self._last_good()} — {fix}")

    def _first_nonfinite_state(self, optimizer: bool = True) -> str | None:
        """The first weight (or, with ``optimizer``, a parameter's optimizer state) holding a NaN or an infinity,
        by name, or None: each rank checks what it holds (its shards, its ZeRO-1 partition), and the ranks agree
        on the answer (one all-reduce), so all of them raise together."""
        names, flags = [], []
        for name, t in self.model.state_dict().items():
            names.append(f"weight '{name}'")
            flags.append(nonfinite_flag(t))
        if optimizer:
            state = getattr(self.optimizer, "optim", self.optimizer).state  # ZeRO-1: this rank's partition
            for name, p in self.model.named_parameters():  # one flag per parameter: the same list on every rank
                names.append(f"the optimizer state of '{name}'")
                flags.append(nonfinite_flag(*state.get(p, {}).values()))
        mask = torch.stack([f.to(self.device) for f in flags]).int()
        if self.dist.enabled:
            mask = self.dist.all_reduce(mask, "max")
        bad = mask.nonzero()
        return names[int(bad[0])] if len(bad) else None

    # ---- evaluation and checkpoints -------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Run the evaluator in eval mode without touching the training RNG streams."""
        if self.evaluation.evaluator is None:
            return {}
        saved_rng = rng_state()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast(), gathered_root(self.loss_module, self.dist):
                result = self.evaluation.evaluator(self.model)
        finally:
            self.model.train(was_training)
            set_rng_state(saved_rng)
        return {k: float(v) for k, v in (result or {}).items()}

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig, *, num_samples: int = 1,
                 generator: torch.Generator | None = None, tokenizer: Any = None,
                 pad_id: int | None = None) -> list[GenerationResult]:
        """Generate with the model being trained (RL rollouts): :func:`lmforge.eval.generate.generate` on this
        rank's model -- a DDP module's inner model, an FSDP2 model gathered once for the call -- under
        ``no_grad`` and the training autocast, in eval mode (dropout off), the training mode restored after.
        Under DDP or FSDP each rank generates for its own prompts, no collective inside the decoding loop."""
        with self._autocast(), gathered_for_generation(self.loss_module, self.dist):
            return generate(self.model, prompts, cfg, num_samples=num_samples, generator=generator,
                            tokenizer=tokenizer, pad_id=pad_id, grad_mode="no_grad")

    def save_checkpoint(self, new_best: bool = False) -> Path:
        self._check_finite()
        bad = self._first_nonfinite_state()
        if bad is not None:
            raise RunError(f"{bad} holds NaN or infinite values at step {self.step}; no checkpoint of it was "
                           f"written and {self._last_good()} — lower train.lr or train.grad_clip")
        state = {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "data": self.train_source.state_dict(),
        }
        trainer_state = {
            "tokens": self.tokens,
            "elapsed_s": self._elapsed(),
            "best_value": self.best_value if math.isfinite(self.best_value) else None,
            "best_metric": self.evaluation.select_metric,
            "best_step": self.best_step,
            "last_metrics": self.last_metrics,
            # a skipped step advanced step, schedule and data position; only the update was dropped
            "nonfinite": {"skipped_steps": list(self.skipped_steps), "consecutive": self._consecutive,
                          "schedule_advanced": True},
        }
        trainer_state["distributed"] = {"strategy": self.dist.strategy, "world_size": self.dist.world_size}
        dist = self.dist
        if dist.strategy == "fsdp":  # every rank writes its shards (torch.distributed.checkpoint)
            path = save_sharded_checkpoint(self.run.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                           state=state, trainer_state=trainer_state, dist=dist)
        else:
            if dist.strategy == "zero1":
                self.optimizer.consolidate_state_dict(to=0)  # collective: rank 0 receives every partition
            path = None
            if dist.is_main:
                path = save_checkpoint(self.run.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                       state=state, trainer_state=trainer_state)
            if dist.strategy == "zero1":
                self.optimizer._all_state_dicts = []  # drop rank 0's consolidated copy (the whole AdamW state)
            dist.barrier()
            path = path or latest_checkpoint(self.run.run_dir)
        if dist.is_main:
            if new_best:
                write_best(self.run.run_dir, self.step, self.best_value, self.evaluation.select_metric)
            prune_checkpoints(self.run.run_dir, self.cfg.keep_last)
        dist.barrier()
        assert path is not None
        return path

    def _restore(self, path: Path) -> None:
        if self.dist.strategy == "fsdp":
            state = load_sharded_checkpoint(path, model=self.model, optimizer=self.optimizer)
        else:
            # zero1: the file holds every partition; read it to the CPU, each rank keeps (and moves) only its own.
            state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, device=self.device,
                                    optimizer_map_location="cpu" if self.dist.strategy == "zero1" else None)
        for group, flags in zip(self.optimizer.param_groups, self._impl_flags):
            group.update(flags)  # the implementation (fused/foreach) is this run's choice, not the saved one
        self.scheduler.load_state_dict(state["scheduler"])  # re-derives lr with this run's max_steps
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if self.dist.enabled and self.device.type == "cuda" and state["rng"].get("cuda"):
            # Rank 0 saved its GPUs' states; this rank's generator is its own device's, which ran in step with
            # rank 0's device 0 (same seed, same calls).
            torch.cuda.set_rng_state(state["rng"]["cuda"][0], device=self.device)
        self.train_source.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.tokens = int(state.get("tokens", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        best = state.get("best_value", state.get("best_val_loss"))
        if best is not None:
            self.best_value = float(best)
        self.best_step = state.get("best_step")
        self.last_metrics = dict(state.get("last_metrics") or {})
        nonfinite = state.get("nonfinite") or {}
        self.skipped_steps = [int(s) for s in nonfinite.get("skipped_steps", [])]
        self._consecutive = int(nonfinite.get("consecutive", 0))
        self._run_on_device.fill_(self._consecutive)
        if self.dist.is_main:
            cut_metrics(self.run.run_dir / METRICS_FILE, self.step)

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._fit_start)

    # ---- the loop -------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train to ``run.max_steps`` (resuming if the run dir says so); with ``evaluation.restore_best``, end with
        the best checkpoint's weights in the model (a collective under fsdp).  Returns the :class:`FitResult`."""
        self._fit_start = time.perf_counter()
        run_dir = self.run.run_dir
        # The newest checkpoint that verifies (rank 0 sets bad newer ones aside, saying so; every rank gets its
        # path); a fresh run in a dir whose checkpoints are all bad (resume=auto) sets them aside too.
        path = self.dist.on_main(lambda: resume_checkpoint(run_dir) if list_checkpoints(run_dir) else None)
        if self.resuming:
            assert path is not None
            self._restore(path)
        else:
            seed_everything(self.run.seed)
        cfg = self.cfg
        main = self.dist.is_main  # only rank 0 logs, shows progress and writes metrics
        logger = MetricsLogger(self.run.run_dir, tensorboard=cfg.tensorboard,
                               purge_step=self.step + 1 if self.resuming else None) if main else None
        progress = Progress(self.run.max_steps, self.step, enabled=self.progress_enabled if main else False)
        if self.resuming:
            progress.message(f"resuming {self.run.run_dir} from step {self.step}")
        if self.dist.enabled:
            progress.message(f"distributed: {self.dist.describe()}, {self.rows_per_rank} rows per rank per step")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        evaluator, select_metric, select_mode = (self.evaluation.evaluator, self.evaluation.select_metric,
                                                 self.evaluation.select_mode)
        window_tokens, window_start = 0, time.perf_counter()
        try:
            while self.step < self.run.max_steps:
                step = self.step + 1
                last = step == self.run.max_steps
                want_log = step % cfg.log_every == 0 or last
                want_eval = evaluator is not None and (last or (cfg.eval_every > 0 and step % cfg.eval_every == 0))
                want_ckpt = cfg.ckpt_every > 0 and (last or step % cfg.ckpt_every == 0)
                batch = self.train_source.next_batch(cfg.global_batch_size)
                stats, grad_norm, lr = self.train_step(batch, collect=want_log or want_eval)
                if not self.rank_memory:
                    self._measure_rank_memory(progress)
                self.step = step
                self.tokens += stats.tokens
                window_tokens += stats.tokens
                progress.advance(step)
                if not (want_log or want_eval or want_ckpt):
                    continue
                self._check_finite()  # never log, evaluate or save a diverged state
                new_best = False
                if want_log or want_eval:
                    now = time.perf_counter()
                    record = self._train_record(stats, grad_norm, lr, window_tokens, now - window_start)
                    window_tokens, window_start = 0, now
                    if want_eval:
                        # Rank 0's numbers decide for all: "new best" triggers a (collective) checkpoint, so no
                        # rank may decide differently because of a last-bit difference in its evaluation.
                        val = self.dist.broadcast_object(self.evaluate())
                        record.update(val)
                        v = val.get(select_metric)
                        if v is not None and math.isfinite(v) and (
                                v < self.best_value if select_mode == "min" else v > self.best_value):
                            self.best_value, self.best_step, new_best = v, step, True
                        window_start = time.perf_counter()  # evaluation time is not training throughput
                    self.last_metrics = record
                    if logger is not None:
                        logger.log(record)
                    progress.report(record)
                if want_ckpt or (new_best and cfg.ckpt_every > 0):
                    self.save_checkpoint(new_best=new_best)
                    window_start = time.perf_counter()  # nor is checkpointing
        except BaseException:
            self._run_lock.release()
            raise
        finally:
            if logger is not None:
                logger.close()
            progress.close()
        try:
            return self._result()
        finally:
            self._run_lock.release()

    def _result(self) -> FitResult:
        """Restore the best weights if asked, and say what the run left (every rank reads the shared run dir)."""
        run_dir = self.run.run_dir
        best_ckpt = best_checkpoint(run_dir)
        restored = self.evaluation.restore_best and best_ckpt is not None
        if restored:
            self.load_weights(best_ckpt)
        metrics_file = run_dir / METRICS_FILE
        best = metrics_at(metrics_file, self.best_step) if self.best_step is not None else None
        return FitResult(final=dict(self.last_metrics), best=best, best_step=self.best_step, run_dir=run_dir,
                         metrics_file=metrics_file, last_checkpoint=latest_checkpoint(run_dir),
                         best_checkpoint=best_ckpt, restored_best=restored)

    def log_record(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` as one more line, e.g. a recipe's test scores after ``fit()``
        (rank 0 writes it; not mirrored to TensorBoard, which holds the training curves)."""
        if not self.dist.is_main:
            return
        logger = MetricsLogger(self.run.run_dir, tensorboard=False)
        try:
            logger.log(record)
        finally:
            logger.close()

    def _measure_rank_memory(self, progress: Progress) -> None:
        """Bytes of parameters and optimizer state on this rank after the first update (the largest over
        ranks), reported once: what ZeRO-1 and FSDP save is visible in every run's log."""
        mem = rank_memory(self.model, self.optimizer)
        if self.dist.enabled:
            t = torch.tensor([mem["param_bytes"], mem["optim_bytes"]], dtype=torch.float64, device=self.device)
            t = self.dist.all_reduce(t, "max")
            mem = {"param_bytes": int(t[0]), "optim_bytes": int(t[1])}
        self.rank_memory = mem
        if self.dist.enabled:
            progress.message(f"per rank: parameters {mem['param_bytes'] / 2**20:.1f} MiB, optimizer state "
                             f"{mem['optim_bytes'] / 2**20:.1f} MiB ({self.dist.strategy}, {self.dist.world_size} ranks)")

    def load_weights(self, path: str | Path) -> None:
        """Load a checkpoint's model weights (not the optimizer) into the model being trained, e.g. the best one
        at the end of ``fit()`` (a collective under fsdp: every rank calls it)."""
        if self.dist.strategy == "fsdp":
            load_sharded_checkpoint(path, model=self.model)
        else:
            load_model_weights(self.model, path, device=self.device)

    def export_model(self) -> nn.Module | None:
        """The trained model, whole and unwrapped, for saving: the model itself, or under fsdp its full weights
        gathered into rank 0's unsharded copy (a collective: every rank calls it; ranks other than 0 get None).
        A model holding a NaN or an infinity is a RunError on every rank: nothing non-finite is ever exported."""
        bad = self._first_nonfinite_state(optimizer=False)
        if bad is not None:
            raise RunError(f"the trained model's {bad} holds NaN or infinite values after step {self.step}; "
                           f"nothing was exported and {self._last_good()} — lower train.lr or train.grad_clip")
        if self.dist.strategy != "fsdp":
            return self.model
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dist.is_main:
            return None
        assert self._export_shell is not None
        missing, unexpected = self._export_shell.load_state_dict(full, strict=False)
        tied = {n for n, p in self._export_shell.named_parameters(remove_duplicate=False)} - set(
            self._export_shell.state_dict())
        if [k for k in missing if k not in tied] or unexpected:
            raise RunError(f"gathering the sharded model for export found mismatched keys (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}); this is a bug in lmforge, please report it")
        return self._export_shell

    def _train_record(self, stats: StepStats, grad_norm: torch.Tensor | None, lr: float, window_tokens: int,
                      window_s: float) -> dict[str, Any]:
        denom = max(stats.count, 1)
        record: dict[str, Any] = {
            "step": self.step,
            "loss": float(stats.loss),
            "lr": lr,
            "tokens": self.tokens,
            "tokens_per_s": window_tokens / window_s if window_s > 0 else 0.0,
            "skipped_steps": len(self.skipped_steps),
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        for k, v in stats.metrics.items():
            record[k] = float(v) / denom
        record["elapsed_s"] = round(self._elapsed(), 3)
        if self.device.type == "cuda":
            record["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        peak = device_peak_flops(self.device, self.compute_dtype)
        if peak and self.flops_per_token and record["tokens_per_s"] > 0:
            # tokens_per_s counts the global batch; the peak is per device, times the ranks.
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (peak * self.dist.world_size)
        if self.rank_memory and self.dist.enabled:
            record["rank_param_mb"] = round(self.rank_memory["param_bytes"] / 2**20, 3)
            record["rank_optim_mb"] = round(self.rank_memory["optim_bytes"] / 2**20, 3)
        return record

