"""Trainable rows of a frozen embedding: the new special tokens of a chat format under a delta method.

A delta method freezes the embedding, but tokens added for a chat template (``<|im_start|>``, ``<|im_end|>``) start
as the mean of the old rows and must learn, or the model never learns to end its turn — PEFT's
``trainable_token_indices``.  Only those rows train: a parametrization replaces the listed rows of the frozen
weight with a small trainable ``[k, d]`` tensor, and the same parametrization sits on a tied LM head, so input and
output rows stay one.  Masking the gradient of the whole weight would not do: AdamW's weight decay would still move
every frozen row.  :func:`bake_token_rows` writes the rows into plain weights again before saving.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize


class NewRows(nn.Module):
    """``weight -> weight`` with rows ``indices`` replaced by the trainable ``rows``."""

    def __init__(self, weight: torch.Tensor, indices: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.long, device=weight.device))
        self.rows = nn.Parameter(weight.detach()[self.indices].clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_put((self.indices,), self.rows.to(weight.dtype))


def train_token_rows(model: nn.Module, indices: Sequence[int]) -> NewRows | None:
    """Make rows ``indices`` of ``model``'s input embedding (and its LM head, tied or not) trainable, the rest of
    both frozen as they are; returns the parametrization of the input side (None for no rows)."""
    if not indices:
        return None
    emb, head = model.get_input_embeddings(), getattr(model, "lm_head", None)
    tied = head is not None and head.weight is emb.weight
    rows = NewRows(emb.weight, indices)
    parametrize.register_parametrization(emb, "weight", rows, unsafe=True)
    if tied:
        parametrize.register_parametrization(head, "weight", rows, unsafe=True)  # the same rows: still one
    elif head is not None:
        parametrize.register_parametrization(head, "weight", NewRows(head.weight, indices), unsafe=True)
    return rows


def bake_token_rows(model: nn.Module) -> None:
    """Plain weights again, the trained rows written in (a tied head re-tied); a no-op without rows."""
    emb, head = model.get_input_embeddings(), getattr(model, "lm_head", None)
    for module in (emb, head):
        if module is not None and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
