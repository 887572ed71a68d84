"""Validation metrics of the pretraining objectives: the evaluators a pretraining run's Trainer calls.

Each takes the model and validation batches (a source's ``val_batches(...)``, fixed masks / corruptions) and
returns means over the objective's targets, ``val_loss`` first among them.  :data:`EVALUATORS` names them by the
objective names of :mod:`lmforge.objectives.registry`; it lives here, not in that registry, because eval sits
above objectives.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from lmforge.models.heads import chunked_cross_entropy
from lmforge.objectives.mlm import MLMObjective
from lmforge.objectives.seq2seq import Seq2SeqObjective

Batches = Iterable[dict[str, torch.Tensor]]


@torch.no_grad()
def evaluate_causal_lm(model: nn.Module, batches: Batches) -> dict[str, float]:
    """Mean next-token loss over the target tokens of ``batches`` (``val_loss``) and its exponential (``val_ppl``)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        hidden = model(batch["input_ids"].to(device))
        loss_sum, n = chunked_cross_entropy(hidden, model.lm_head, batch["labels"].to(device))
        total += float(loss_sum)
        count += int(n)
    val_loss = total / max(count, 1)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


@torch.no_grad()
def evaluate_mlm(model: nn.Module, batches: Batches) -> dict[str, float]:
    """Validation means over ``batches``: ``val_loss`` (= MLM + NSP, as in training), ``val_mlm_loss``,
    ``val_mlm_acc`` and, with NSP, ``val_nsp_loss`` and ``val_nsp_acc`` (means over examples)."""
    device = next(model.parameters()).device
    tot: dict[str, float] = {}
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        if "nsp_scale" in batch:  # scale 1: plain NSP sums over examples
            batch["nsp_scale"] = torch.ones_like(batch["nsp_scale"])
        out = MLMObjective().loss(model, batch)
        tot["masked"] = tot.get("masked", 0.0) + float(out.count)
        tot["rows"] = tot.get("rows", 0.0) + batch["input_ids"].shape[0]
        for k, v in out.metrics.items():
            tot[k] = tot.get(k, 0.0) + float(v)
    res = {f"val_{k}": tot.get(k, 0.0) / max(tot.get("masked", 0.0), 1.0) for k in ("mlm_loss", "mlm_acc")}
    if "nsp_loss" in tot:
        res.update({f"val_{k}": tot[k] / max(tot["rows"], 1.0) for k in ("nsp_loss", "nsp_acc")})
    res["val_loss"] = res["val_mlm_loss"] + res.get("val_nsp_loss", 0.0)
    return res


@torch.no_grad()
def evaluate_span(model: nn.Module, batches: Batches) -> dict[str, float]:
    """Validation means over the target tokens of ``batches`` (e.g. ``source.val_batches(...)``): ``val_loss``
    (cross-entropy, as in training) and ``val_target_acc``."""
    device = next(model.parameters()).device
    objective = Seq2SeqObjective()
    loss = correct = count = 0.0
    for batch in batches:
        out = objective.loss(model, {k: v.to(device) for k, v in batch.items()})
        loss += float(out.loss_sum)
        correct += float(out.metrics["target_acc"])
        count += float(out.count)
    return {"val_loss": loss / max(count, 1.0), "val_target_acc": correct / max(count, 1.0)}


EVALUATORS: dict[str, Callable[[nn.Module, Batches], dict[str, float]]] = {
    "causal_lm": evaluate_causal_lm, "mlm_nsp": evaluate_mlm, "span": evaluate_span}
"""Evaluator by pretraining-objective name; an objective registered elsewhere adds its own entry."""
