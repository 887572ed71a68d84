"""Causal language modelling: next-token prediction on packed windows or padded sequences (GPT-2, Llama)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lmforge.models.heads import chunked_cross_entropy
from lmforge.objectives.base import IGNORE_INDEX, Objective, ObjectiveOutput


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
        hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        kwargs = {"ignore_index": self.ignore_index}
        if self.chunk_size is not None:
            kwargs["chunk_size"] = self.chunk_size
        loss_sum, count = chunked_cross_entropy(hidden, model.lm_head, batch["labels"], **kwargs)
        return ObjectiveOutput(loss_sum=loss_sum, count=count)
