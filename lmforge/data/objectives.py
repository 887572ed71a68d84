"""Objectives: a collator that turns token windows/examples into a batch, and a loss on a model's output.

The Trainer's side of the seam (see docs/CONTRACTS.md):

- ``loss(model, batch) -> ObjectiveOutput(loss_sum, count, metrics)`` — the loss **summed** over the
  batch's targets (tokens, examples or pairs), never averaged, so the Trainer can divide by the target
  count of the whole global batch (all micro-batches, later all ranks).  ``metrics`` are sums too, over
  the same targets; the Trainer logs ``sum over the global batch / global count``.
- ``target_count(batch)`` — the number of targets in a (global) batch, known *before* any forward, so
  each micro-batch's backward can already use the global denominator.  It must equal the sum of the
  ``count`` that ``loss`` returns for the batch's parts.
- ``input_tokens(batch)`` — real (non-pad) input tokens in a batch, for throughput and the ``tokens``
  column of metrics.jsonl.
- ``frozen_modules()`` — modules the objective owns (a DPO reference model, a reward model): the Trainer
  moves them to the device, puts them in eval mode with ``requires_grad_(False)``, and never optimises
  or checkpoints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

IGNORE_INDEX = -100


@dataclass
class ObjectiveOutput:
    """``loss_sum``: summed loss (0-dim tensor with grad); ``count``: its number of targets;
    ``metrics``: name -> summed value over the same targets (detached tensors or floats)."""

    loss_sum: torch.Tensor
    count: torch.Tensor | int
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


def count_input_tokens(batch: dict[str, Any]) -> int:
    """Non-pad input tokens: ``attention_mask`` sums where present, else ``input_ids`` sizes.

    Keys ending in ``attention_mask`` / ``input_ids`` count too (``chosen_input_ids`` for preference pairs).
    """
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and torch.is_tensor(v)]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return int(sum(v.numel() for k, v in batch.items() if k.endswith("input_ids") and torch.is_tensor(v)))


class Objective:
    """Base class with the defaults of the seam; subclasses implement ``collate``, ``loss``, ``target_count``."""

    def collate(self, raw: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        raise NotImplementedError

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return count_input_tokens(batch)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {}


class CausalLMObjective(Objective):
    """Next-token prediction.

    Batch: ``input_ids`` ``[B, T]``, ``labels`` ``[B, T]`` **aligned with the inputs** — ``labels[:, t]`` is
    the token to predict after position ``t`` (the collator shifts; ``-100`` = not a target) — and an
    optional ``attention_mask`` ``[B, T]`` (1 = real token).  The model maps ``input_ids`` to hidden
    states; the loss runs through :func:`lmforge.models.heads.chunked_cross_entropy` with the model's
    ``lm_head`` so the full ``[B, T, V]`` fp32 logits are never materialised.
    """

    def __init__(self, pad_id: int = 0, ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> None:
        self.pad_id = pad_id
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size

    def collate(self, raw: Any) -> dict[str, torch.Tensor]:
        """Packed windows ``[B, T+1]`` (tensor/array) -> ``input_ids``/``labels`` ``[B, T]``; or a list of
        1-D token sequences of different lengths -> right-padded with ``attention_mask`` and ``-100`` labels
        at pads."""
        if isinstance(raw, (torch.Tensor, np.ndarray)) and raw.ndim == 2:
            windows = torch.as_tensor(raw, dtype=torch.long)
            return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}
        seqs: Sequence = raw
        lengths = [len(s) - 1 for s in seqs]
        if not seqs or min(lengths) < 1:
            raise ValueError("causal-LM collate needs sequences of at least 2 tokens")
        width = max(lengths)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), self.ignore_index, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            s = torch.as_tensor(s, dtype=torch.long)
            input_ids[i, :n] = s[:-1]
            labels[i, :n] = s[1:]
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != self.ignore_index).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        from lmforge.models.heads import chunked_cross_entropy

        hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        kwargs = {"ignore_index": self.ignore_index}
        if self.chunk_size is not None:
            kwargs["chunk_size"] = self.chunk_size
        loss_sum, count = chunked_cross_entropy(hidden, model.lm_head, batch["labels"], **kwargs)
        return ObjectiveOutput(loss_sum=loss_sum, count=count)
