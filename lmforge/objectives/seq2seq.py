"""Sequence-to-sequence cross-entropy over the target tokens of an encoder–decoder (T5): the loss of span
corruption (:mod:`lmforge.objectives.span`) and of text-to-text fine-tuning (:mod:`lmforge.objectives.text_to_text`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.core.errors import DataError
from lmforge.models.heads import chunked_cross_entropy
from lmforge.objectives.base import IGNORE_INDEX, Objective, ObjectiveOutput


class Seq2SeqObjective(Objective):
    """Cross-entropy over target tokens of an encoder-decoder model (span corruption, text-to-text).

    Batch: ``input_ids``/``attention_mask`` ``[B, S]`` (encoder), ``labels`` ``[B, T]`` (-100 = no target),
    optional ``decoder_input_ids`` (default ``model.shift_right(labels)``).  The loss runs
    :func:`lmforge.models.heads.chunked_cross_entropy` on the decoder output, which already carries T5 v1.0's
    ``d_model ** -0.5`` rescaling (``EncoderDecoderLM.decode`` applies it), with ``model.lm_head``.  Metric
    ``target_acc``: summed correct argmax predictions (logged as target-token accuracy).
    """

    def __init__(self, pad_id: int = 0, ignore_index: int = IGNORE_INDEX, chunk_size: int | None = None) -> None:
        self.pad_id, self.ignore_index, self.chunk_size = pad_id, ignore_index, chunk_size

    def collate(self, raw: Any) -> dict[str, torch.Tensor]:
        """A list of ``(input_ids, target_ids)`` pairs -> right-padded batch (``-100`` labels at padding)."""
        pairs = list(raw)
        if not pairs or any(len(x) == 0 or len(y) == 0 for x, y in pairs):
            raise DataError("seq2seq collate needs non-empty (input, target) token sequences")
        S, T = max(len(x) for x, _ in pairs), max(len(y) for _, y in pairs)
        input_ids = torch.full((len(pairs), S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), S), dtype=torch.long)
        labels = torch.full((len(pairs), T), self.ignore_index, dtype=torch.long)
        for i, (x, y) in enumerate(pairs):
            input_ids[i, :len(x)] = torch.as_tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
            labels[i, :len(y)] = torch.as_tensor(y, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != self.ignore_index).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]
        dec_in = batch.get("decoder_input_ids")
        if dec_in is None:
            dec_in = model.shift_right(labels)
        hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), decoder_input_ids=dec_in)
        kwargs = {"ignore_index": self.ignore_index}
        if self.chunk_size is not None:
            kwargs["chunk_size"] = self.chunk_size
        loss_sum, count = chunked_cross_entropy(hidden, model.lm_head, labels, **kwargs)
        return ObjectiveOutput(loss_sum, count, {"target_acc": _correct(hidden.detach(), model.lm_head, labels,
                                                                        self.ignore_index)})


@torch.no_grad()
def _correct(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of target positions whose argmax prediction is the label (head applied to target rows only,
    in chunks of ~16M logits)."""
    valid = labels != ignore_index
    h, y = hidden[valid], labels[valid]
    step = max(1, (1 << 24) // lm_head.weight.shape[0])
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for s in range(0, h.shape[0], step):
        correct += (lm_head(h[s:s + step]).argmax(-1) == y[s:s + step]).sum()
    return correct
