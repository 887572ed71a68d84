"""The objective seam: a collator that turns token windows/examples into a batch, and a loss on a model's output.

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
from typing import Any

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
