"""Weak-to-strong supervision (Burns et al. 2023, "Weak-to-strong generalization"): a student classifier trained on
a weak supervisor's soft labels.

Two losses, as the paper's code (openai/weak-to-strong, ``weak_to_strong/loss.py``) defines them:

* ``ce`` (``xent_loss``): cross entropy against the weak soft labels ``w`` (rows of class probabilities);
* ``logconf`` (``logconf_loss_fn``, the auxiliary confidence loss): cross entropy against
  ``t = (1 − α)·w + α·ŷ``, where ``ŷ`` are the student's own predictions hardened by a threshold: binary only,
  ``ŷ = [p₀ ≥ τ, p₀ < τ]`` with ``τ`` the ``mean(w[:, 1])``-quantile of the student's ``p₀ = softmax(logits)[:, 0]``
  over the **whole optimizer batch** — so the share of rows hardened to class 1 matches the weak labels' class
  balance.  ``α = aux_coef·step_frac`` while ``step_frac ≤ warmup_frac``, then ``aux_coef`` (the paper's schedule:
  it ramps to ``aux_coef·warmup_frac`` and then jumps to ``aux_coef``; defaults 0.5 and 0.1); ``step_frac`` is
  completed steps / total steps before the update, as the paper's ``step / nsteps``.

The quantile needs every row of the optimizer batch at once, while the Trainer computes gradients micro-batch by
micro-batch.  The Trainer therefore calls :meth:`SoftLabelObjective.prepare_batch` once per optimizer batch
(``prepare_batch`` in docs/CONTRACTS.md): a no-grad pass of the student over all of its micro-batches, in eval mode,
gives ``ŷ`` and the mixed target ``t`` for every row; each micro-batch's loss then only reads its rows of ``t``.
Since ``ŷ`` is detached in the paper too, the gradient is the paper's whole-batch one (exactly so without dropout;
with dropout the paper hardens the dropped-out training pass, lmforge the clean one).

The multi-class case is refused (the paper's loss is binary, and no one balance-matching hardening of ``C > 2``
classes is standard); ``ce`` works for any number of classes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.objectives.base import Objective, ObjectiveOutput

LOSSES = ("ce", "logconf")


def confidence_alpha(step_frac: float, aux_coef: float, warmup_frac: float) -> float:
    """The weight of the student's own hardened predictions at ``step_frac`` (``logconf_loss_fn``'s ``coef``)."""
    return aux_coef * (1.0 if step_frac > warmup_frac else step_frac)


def hardened_predictions(probs: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` one-hot rows: class 0 where ``probs[:, 0]`` is at or above its ``mean(weak[:, 1])``-quantile over
    the N rows (torch's linear interpolation, as the paper's ``torch.quantile``), else class 1."""
    p0 = probs[:, 0].float()
    threshold = torch.quantile(p0, weak[:, 1].float().mean())
    return torch.stack([p0 >= threshold, p0 < threshold], dim=1).to(probs.dtype)


def confidence_target(logits: torch.Tensor, weak: torch.Tensor, step_frac: float, aux_coef: float,
                      warmup_frac: float) -> torch.Tensor:
    """``(1 − α)·weak + α·hardened(softmax(logits))`` over the rows given (the whole optimizer batch), detached."""
    alpha = confidence_alpha(step_frac, aux_coef, warmup_frac)
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return weak.float() * (1 - alpha) + hardened_predictions(probs, weak) * alpha


def soft_cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``Σ_rows −Σ_c target·log softmax(logits)`` (``F.cross_entropy`` with probability targets, summed)."""
    return F.cross_entropy(logits.float(), target.float(), reduction="sum")


class SoftLabelObjective(Objective):
    """A classification objective (:class:`~lmforge.objectives.classification.ClassificationObjective`) trained on
    soft labels.  Encoded training examples carry ``"soft"`` (a probability per class); the batch gets
    ``soft_labels [B, C]``.  Batches without soft labels (validation, test) fall back to the base objective's
    ground-truth loss, which is reported, never used to choose the model."""

    def __init__(self, base: Any, num_labels: int, loss: str = "ce", aux_coef: float = 0.5,
                 warmup_frac: float = 0.1) -> None:
        if loss not in LOSSES:
            raise ConfigError(f"w2s loss {loss!r} is unknown; use one of {', '.join(LOSSES)}")
        if loss == "logconf" and num_labels != 2:
            raise ConfigError(f"the auxiliary confidence loss (logconf) is binary, as the paper's; this task has "
                              f"{num_labels} labels — use losses=[ce] or a two-label task")
        self.base, self.kind, self.aux_coef, self.warmup_frac = base, loss, float(aux_coef), float(warmup_frac)

    def encode(self, rec: dict[str, Any]) -> dict[str, Any]:
        return self.base.encode(rec)

    @property
    def truncated(self) -> int:
        """Inputs the base objective cut to its maximum length (fine-tuning reports them)."""
        return self.base.truncated

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.base.logits(model, batch)

    def collate(self, raw: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.base.collate(list(raw))
        if raw and "soft" in raw[0]:
            batch["soft_labels"] = torch.tensor([r["soft"] for r in raw], dtype=torch.float32)
        return batch

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return self.base.target_count(batch)

    def input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def prepare_batch(self, model: nn.Module, micros: list[dict[str, Any]], step_frac: float
                      ) -> dict[str, torch.Tensor]:
        """The Trainer's once-per-optimizer-batch hook: ``{"target": [B, C]}`` for logconf (nothing for ce)."""
        if self.kind != "logconf" or "soft_labels" not in micros[0]:
            return {}
        logits = torch.cat([self.base.logits(model, m) for m in micros])
        weak = torch.cat([m["soft_labels"] for m in micros])
        return {"target": confidence_target(logits, weak, step_frac, self.aux_coef, self.warmup_frac)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        if "soft_labels" not in batch:
            return self.base.loss(model, batch)
        logits = self.base.logits(model, batch).float()
        weak = batch["soft_labels"]
        target = batch.get("target", weak) if self.kind == "logconf" else weak
        if self.kind == "logconf" and "target" not in batch:
            raise ConfigError("the confidence loss needs the Trainer's prepare_batch hook (the whole optimizer "
                              "batch's quantile); train it with lmforge's Trainer")
        pred = logits.detach().argmax(-1)
        metrics = {"agree_weak": (pred == weak.argmax(-1)).sum()}  # (the rows' labels are the weak's too)
        return ObjectiveOutput(soft_cross_entropy_sum(logits, target), int(weak.shape[0]), metrics)
