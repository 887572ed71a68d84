"""Fine-tuning objectives: task records -> token ids (``encode``) -> batches (``collate``) -> summed loss.

Each objective follows the seam of :mod:`lmforge.data.objectives` (summed loss + target count, so the
Trainer's global normalisation holds) and adds ``encode(record) -> example`` with truncation to the
model's maximum; ``truncated`` counts the examples that were cut (the report shows it, nothing crashes).

* :class:`ClassificationObjective` — one label per sequence, for a :class:`~lmforge.models.task.SequenceClassifier`:
  BERT reads ``[CLS] a [SEP] (b [SEP])`` with segment ids; decoders read ``a (\\n b) EOS`` and classify the
  last real token.  Optional GPT-1 auxiliary LM loss (Radford et al. 2018, §3.2: L3 = L2 + λ·L1) on the
  input text, λ = ``aux_lm_weight``, added per example as the mean token loss.
* :class:`TokenClassificationObjective` — one tag per word (first sub-token carries it, the rest are
  ignored, as in transformers' token-classification examples), for a ``TokenClassifier``.
* :class:`TextToTextObjective` — T5: ``input EOS`` -> ``target EOS`` with teacher forcing.
* :class:`CompletionObjective` — decoders: ``prompt`` -> ``completion EOS`` with the loss on the completion
  only; the same masking the SFT stage extends to chat turns.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.data.objectives import IGNORE_INDEX, CausalLMObjective, Objective, ObjectiveOutput
from lmforge.data.span import Seq2SeqObjective


class ExampleSource:
    """Shuffled epochs over encoded examples: ``next_batch(n)`` for the Trainer, resumable exactly.

    The order of epoch ``e`` is a permutation drawn from ``seed + e``, so a resumed run (which restores
    ``(epoch, position)``) sees the same batches as an uninterrupted one.
    """

    def __init__(self, examples: Sequence[Any], collate: Callable[[list[Any]], dict[str, torch.Tensor]],
                 seed: int = 0, shuffle: bool = True) -> None:
        if not examples:
            raise ConfigError("the training split is empty; add examples")
        self.examples, self.collate, self.seed, self.shuffle = list(examples), collate, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < n:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            take = self._order[self.pos:self.pos + n - len(picked)]
            picked.extend(self.examples[i] for i in take)
            self.pos += len(take)
        return self.collate(picked)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": len(self.examples)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if int(sd["n"]) != len(self.examples):
            raise ConfigError(f"the checkpoint was trained on {sd['n']} examples, this run has {len(self.examples)}; "
                              f"resume with the same task")
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])
        self._order = self._perm(self.epoch)


def batches(examples: Sequence[Any], collate: Callable, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Examples in order, ``batch_size`` at a time (evaluation)."""
    for i in range(0, len(examples), batch_size):
        yield collate(list(examples[i:i + batch_size]))


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _mask(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    return _pad([[1] * len(s) for s in seqs], 0)


class _Encoding:
    """Shared encode-time state: tokenizer, length limit, truncation counter."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self.truncated = 0

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


class ClassificationObjective(_Encoding, Objective):
    """Cross-entropy over one label per sequence; metric ``correct``.

    Batch: ``input_ids``/``attention_mask`` ``[B, T]`` (right-padded), ``token_type_ids`` (bert), ``labels``
    ``[B]``, and ``lm_labels`` ``[B, T]`` when the auxiliary LM loss is on.
    """

    def __init__(self, tokenizer: Any, family: str, label2id: dict[str, int], max_length: int,
                 aux_lm_weight: float = 0.0, append_eos: bool = False) -> None:
        super().__init__(tokenizer, max_length)
        self.family, self.label2id, self.aux_lm_weight = family, dict(label2id), float(aux_lm_weight)
        self.append_eos = bool(append_eos)  # decoders: the classifier reads EOS (True) or the text's last token
        if self.aux_lm_weight and family == "bert":
            raise ConfigError("head.aux_lm_weight is the GPT-1 auxiliary language-model loss and needs a decoder "
                              "(gpt2, llama); set it to 0 for bert")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        if family == "bert":
            self.cls_id, self.sep_id = tokenizer.cls_id, tokenizer.sep_id
            if self.cls_id is None or self.sep_id is None:
                raise ConfigError("the BERT tokenizer has no [CLS]/[SEP] tokens (cls_token/sep_token); classification "
                                  "input is '[CLS] text [SEP]'")
        elif tokenizer.eos_id is None and self.append_eos:
            raise ConfigError("the tokenizer has no EOS token, which head.append_eos=true puts at the end of each "
                              "input; set head.append_eos=false to classify from the text's last token")

    def encode(self, rec: dict[str, Any]) -> dict[str, Any]:
        a, b = self.ids(rec["text"]), self.ids(rec["text_pair"]) if rec.get("text_pair") else None
        if self.family == "bert":
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
        if self.family == "bert":
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
        batch = {"input_ids": _pad(seqs, self.pad_id), "attention_mask": _mask(seqs),
                 "labels": torch.tensor([r["label"] for r in raw], dtype=torch.long)}
        if "token_type_ids" in raw[0]:
            batch["token_type_ids"] = _pad([r["token_type_ids"] for r in raw], 0)
        if self.aux_lm_weight:
            lm = _pad([s[1:] for s in seqs], IGNORE_INDEX)
            batch["lm_labels"] = torch.cat([lm, torch.full((len(seqs), 1), IGNORE_INDEX)], 1)[:, :batch["input_ids"].shape[1]]
        return batch

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        mask = batch["attention_mask"]
        hidden = model.features(batch["input_ids"], attention_mask=mask, token_type_ids=batch.get("token_type_ids"))
        logits = model.classify(hidden, attention_mask=mask).float()
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


class TokenClassificationObjective(_Encoding, Objective):
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
        return {"input_ids": _pad(seqs, self.pad_id), "attention_mask": _mask(seqs),
                "labels": _pad([r["labels"] for r in raw], IGNORE_INDEX)}

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).float()  # [B, T, C]
        labels = batch["labels"]
        loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        keep = labels != IGNORE_INDEX
        correct = (logits.detach().argmax(-1)[keep] == labels[keep]).sum()
        return ObjectiveOutput(loss, int(keep.sum()), {"correct": correct})


class TextToTextObjective(_Encoding, Seq2SeqObjective):
    """T5: ``input EOS`` -> ``target EOS``; collate and loss are :class:`Seq2SeqObjective`'s."""

    def __init__(self, tokenizer: Any, max_length: int, max_target_length: int) -> None:
        _Encoding.__init__(self, tokenizer, max_length)
        Seq2SeqObjective.__init__(self, pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        if tokenizer.eos_id is None:
            raise ConfigError("the tokenizer has no EOS token, which T5 inputs and targets end with")
        self.max_target_length = int(max_target_length)

    def encode(self, rec: dict[str, Any]) -> tuple[list[int], list[int]]:
        # the target as running text (" 38", not "38"), so copying an input word copies its token ids
        x, y = self.ids(rec["input"]), self.ids(self.tokenizer.word_prefix + rec["target"])
        if len(x) > self.max_length - 1 or len(y) > self.max_target_length - 1:
            self.truncated += 1
        eos = self.tokenizer.eos_id
        return x[:self.max_length - 1] + [eos], y[:self.max_target_length - 1] + [eos]


class CompletionObjective(_Encoding, CausalLMObjective):
    """Decoders: prompt -> completion with next-token loss on the completion tokens only.

    ``encode`` returns ``(prompt_ids, completion_ids)``; the prompt is ``prompt_template`` with the input
    (only the input is truncated, so the template's question/answer cue always survives), the completion
    is ``' ' + target + EOS``.  ``collate`` builds ``prompt + completion`` rows with :class:`CausalLMObjective`'s
    padding and sets the labels of prompt positions to -100.
    """

    def __init__(self, tokenizer: Any, max_length: int, max_target_length: int,
                 prompt_template: str = "{input}\nAnswer:") -> None:
        _Encoding.__init__(self, tokenizer, max_length)
        CausalLMObjective.__init__(self, pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        if tokenizer.eos_id is None:
            raise ConfigError("the tokenizer has no EOS token, which ends every completion")
        self.max_target_length = int(max_target_length)
        self.before, self.after = prompt_template.split("{input}", 1)

    def prompt_ids(self, text: str, room: int) -> list[int]:
        head = self.ids(self.before) if self.before else []
        tail = self.ids(self.after) if self.after else []
        body = self.ids(text)
        keep = max(1, room - len(head) - len(tail))
        if len(body) > keep:
            self.truncated += 1
            body = body[:keep]
        return head + body + tail

    def encode(self, rec: dict[str, Any]) -> tuple[list[int], list[int]]:
        y = self.ids(self.tokenizer.word_prefix + rec["target"])
        if len(y) > self.max_target_length - 1:
            self.truncated += 1
            y = y[:self.max_target_length - 1]
        y = y + [self.tokenizer.eos_id]
        return self.prompt_ids(rec["input"], self.max_length + 1 - len(y)), y

    def collate(self, raw: Any) -> dict[str, torch.Tensor]:
        pairs = list(raw)
        batch = CausalLMObjective.collate(self, [p + c for p, c in pairs])
        for i, (p, _c) in enumerate(pairs):
            batch["labels"][i, :len(p) - 1] = IGNORE_INDEX  # labels[t] predicts token t+1: prompt targets off
        return batch
