"""Token classification: one tag per word (its first sub-token carries it, the rest are ignored, as in
transformers' token-classification examples), for a :class:`~lmforge.models.task.TokenClassifier`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.objectives.base import IGNORE_INDEX, Objective, ObjectiveOutput
from lmforge.objectives.encoding import TaskEncoding, pad_sequences, padding_mask


class TokenClassificationObjective(TaskEncoding, Objective):
    """Cross-entropy over one tag per word (its first sub-token); metric ``correct``.  BERT input
    ``[CLS] w1 w2 ... [SEP]``; ``n_words`` words were kept (the rest truncated and predicted 'O')."""

    def __init__(self, tokenizer: Any, label2id: dict[str, int], max_length: int) -> None:
        super().__init__(tokenizer, max_length)
        self.label2id = dict(label2id)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.cls_id, self.sep_id = tokenizer.cls_id, tokenizer.sep_id
        if self.cls_id is None or self.sep_id is None:
            raise ConfigError("the tokenizer has no [CLS]/[SEP] tokens; token classification reads '[CLS] words [SEP]'")

    def encode(self, rec: dict[str, Any]) -> dict[str, Any]:
        ids, labels = [self.cls_id], [IGNORE_INDEX]
        kept = 0
        for i, (word, tag) in enumerate(zip(rec["tokens"], rec["tags"])):
            piece = self.ids(word if i == 0 else " " + word) or [self.tokenizer.unk_id or self.pad_id]
            if len(ids) + len(piece) + 1 > self.max_length:
                self.truncated += 1
                break
            ids += piece
            labels += [self.label2id[tag]] + [IGNORE_INDEX] * (len(piece) - 1)
            kept += 1
        return {"input_ids": ids + [self.sep_id], "labels": labels + [IGNORE_INDEX], "n_words": kept}

    def collate(self, raw: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [r["input_ids"] for r in raw]
        return {"input_ids": pad_sequences(seqs, self.pad_id), "attention_mask": padding_mask(seqs),
                "labels": pad_sequences([r["labels"] for r in raw], IGNORE_INDEX)}

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()  # [B, T, C]
        labels = batch["labels"]
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        keep = labels != IGNORE_INDEX
        correct = (logits.detach().argmax(-1)[keep] == labels[keep]).sum()
        return ObjectiveOutput(loss, int(keep.sum()), {"correct": correct})
