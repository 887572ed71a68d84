"""Sequence classification: one label per sequence, for a :class:`~lmforge.models.task.SequenceClassifier`.

The input follows the family's classifier layout (``Family.classifier``): a pooled classifier (BERT) reads
``[CLS] a [SEP] (b [SEP])`` with segment ids; a last-token one (decoders) reads ``a (\\n b) EOS`` and classifies the
last real token.  Optional GPT-1 auxiliary LM loss (Radford et al. 2018, §3.2: L3 = L2 + λ·L1) on the input text,
λ = ``aux_lm_weight``, added per example as the mean token loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.models.families import get_family
from lmforge.objectives.base import IGNORE_INDEX, Objective, ObjectiveOutput
from lmforge.objectives.encoding import TaskEncoding, pad_sequences, padding_mask


class ClassificationObjective(TaskEncoding, Objective):
    """Cross-entropy over one label per sequence; metric ``correct``.

    Batch: ``input_ids``/``attention_mask`` ``[B, T]`` (right-padded), ``token_type_ids`` (pooled: bert),
    ``labels`` ``[B]``, and ``lm_labels`` ``[B, T]`` when the auxiliary LM loss is on.  ``family`` is a registered
    family's name.
    """

    def __init__(self, tokenizer: Any, family: str, label2id: dict[str, int], max_length: int,
                 aux_lm_weight: float = 0.0, append_eos: bool = False) -> None:
        super().__init__(tokenizer, max_length)
        self.family, self.label2id, self.aux_lm_weight = family, dict(label2id), float(aux_lm_weight)
        self.append_eos = bool(append_eos)  # decoders: the classifier reads EOS (True) or the text's last token
        fam = get_family(family)
        self.pooled = fam.classifier == "pooled"  # [CLS] a [SEP] b [SEP]; else the text ends where it is classified
        if self.aux_lm_weight and self.pooled:  # the auxiliary loss is a decoder's next-token loss on the input
            raise ConfigError("head.aux_lm_weight is the GPT-1 auxiliary language-model loss and needs a decoder "
                              "(gpt2, llama); set it to 0 for bert")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        if self.pooled:
            self.cls_id, self.sep_id = tokenizer.cls_id, tokenizer.sep_id
            if self.cls_id is None or self.sep_id is None:
                raise ConfigError("the BERT tokenizer has no [CLS]/[SEP] tokens (cls_token/sep_token); classification "
                                  "input is '[CLS] text [SEP]'")
        elif tokenizer.eos_id is None and self.append_eos:
            raise ConfigError("the tokenizer has no EOS token, which head.append_eos=true puts at the end of each "
                              "input; set head.append_eos=false to classify from the text's last token")

    def encode(self, rec: dict[str, Any]) -> dict[str, Any]:
        a, b = self.ids(rec["text"]), self.ids(rec["text_pair"]) if rec.get("text_pair") else None
        if self.pooled:
            budget = self.max_length - (3 if b is not None else 2)
        else:
            sep = self.ids("\n")
            b = sep + b if b is not None else None
            budget = self.max_length - int(self.append_eos)
        total = len(a) + (len(b) if b is not None else 0)
        if total > budget:  # longest first, as transformers' truncation="longest_first"
            self.truncated += 1
            while len(a) + (len(b) if b is not None else 0) > budget:
                if b is not None and len(b) > len(a):
                    b = b[:-1]
                else:
                    a = a[:-1]
        if self.pooled:
            ids = [self.cls_id, *a, self.sep_id]
            types = [0] * len(ids)
            if b is not None:
                ids += [*b, self.sep_id]
                types += [1] * (len(b) + 1)
            return {"input_ids": ids, "token_type_ids": types, "label": self.label2id[rec["label"]]}
        ids = [*a, *(b or []), *([self.tokenizer.eos_id] if self.append_eos else [])]
        return {"input_ids": ids, "label": self.label2id[rec["label"]]}

    def collate(self, raw: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [r["input_ids"] for r in raw]
        batch = {"input_ids": pad_sequences(seqs, self.pad_id), "attention_mask": padding_mask(seqs),
                 "labels": torch.tensor([r["label"] for r in raw], dtype=torch.long)}
        if "token_type_ids" in raw[0]:
            batch["token_type_ids"] = pad_sequences([r["token_type_ids"] for r in raw], 0)
        if self.aux_lm_weight:
            lm = pad_sequences([s[1:] for s in seqs], IGNORE_INDEX)
            batch["lm_labels"] = torch.cat([lm, torch.full((len(seqs), 1), IGNORE_INDEX)], 1)[:, :batch["input_ids"].shape[1]]
        return batch

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def _hidden_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["attention_mask"]
        hidden = model.features(batch["input_ids"], attention_mask=mask, token_type_ids=batch.get("token_type_ids"))
        return hidden, model.classify(hidden, attention_mask=mask).float()

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, num_labels]`` class logits (fp32) of a batch."""
        return self._hidden_logits(model, batch)[1]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        hidden, logits = self._hidden_logits(model, batch)
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        metrics: dict[str, Any] = {"correct": (logits.detach().argmax(-1) == batch["labels"]).sum()}
        if self.aux_lm_weight:
            lm_labels = batch["lm_labels"]
            lm_logits = model.backbone.logits(hidden).float()  # [B, T, V]
            per_tok = F.cross_entropy(lm_logits.transpose(1, 2), lm_labels, ignore_index=IGNORE_INDEX,
                                      reduction="none")  # [B, T]
            n = (lm_labels != IGNORE_INDEX).sum(1).clamp(min=1)
            lm = (per_tok.sum(1) / n).sum()  # summed over examples, like the classification loss
            loss = loss + self.aux_lm_weight * lm
            metrics["lm_loss"] = lm.detach()
        return ObjectiveOutput(loss, int(batch["labels"].numel()), metrics)
