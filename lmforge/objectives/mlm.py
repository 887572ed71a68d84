"""Masked language modelling (+ next-sentence prediction): BERT's pretraining objective and its batches.

**Masking** (:func:`mask_tokens`).  In each row, ``k = floor(mask_prob * n + u)`` (``u ~ U[0, 1)``, so
``E[k] = mask_prob * n``; at least 1) of the ``n`` maskable positions are selected uniformly without
replacement -- never [CLS], [SEP], [PAD], [MASK] or any other special token.  Of the selected, 80%
become [MASK], 10% a random token drawn from the non-special vocabulary, 10% stay; labels are the
original ids there and -100 elsewhere.  Masking happens when a batch is fetched (dynamic masking: every
visit of a window gets a new mask) from a ``torch.Generator`` whose state is in the source's
``state_dict``, so a resumed run draws exactly the masks an uninterrupted one would.

**NSP pairs** (``nsp: true``): ``[CLS] A [SEP] B [SEP]`` rows with a next-sentence label, sampled from the
documents by :class:`~lmforge.data.sentence_pairs.SentencePairs` (data: which tokens form an example) and masked
here.  ``nsp: false`` gives RoBERTa's full-sentence inputs instead: the token stream (documents separated by
their EOS/SEP) is cut into windows of ``seq_len - 2`` tokens, each ``[CLS] window [SEP]``, no padding and no NSP
loss.

**Loss normalisation.**  The target count is the number of masked tokens ``M`` of the global batch.  The
batch source also stores ``nsp_scale = M / N`` (``N`` = examples in the global batch) on every row, and
the objective returns ``loss_sum = sum(MLM CE) + sum(NSP CE * nsp_scale)``.  After the Trainer divides by
``M`` the step's loss is ``mean MLM CE + mean NSP CE`` -- exactly BERT's (and transformers'
``BertForPreTraining``) loss -- and since the scale comes from the global batch, it is independent of
micro-batching.  Metrics follow the same rule: ``mlm_loss``/``mlm_acc`` are sums over masked tokens,
``nsp_loss``/``nsp_acc`` per-example sums times ``nsp_scale``, so each logs as a plain mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError, DataError, RunError
from lmforge.data.loader import PackedWindows
from lmforge.data.sentence_pairs import SentencePairs
from lmforge.objectives.base import IGNORE_INDEX, Objective, ObjectiveOutput

_VAL_SEED = 0x5EED  # validation masks come from their own fixed generator


@dataclass
class MLMConfig:
    """The masking/NSP settings (the ``mlm:`` section of a run config)."""

    mask_prob: float = 0.15
    """Share of maskable (non-special) tokens selected as targets."""
    mask_token_ratio: float = 0.8
    """Of the selected tokens: share replaced by [MASK]."""
    random_token_ratio: float = 0.1
    """Of the selected tokens: share replaced by a random non-special token (the rest stay unchanged)."""
    nsp: bool = True
    """Sentence pairs with next-sentence prediction (BERT); false = full-sentence inputs (RoBERTa)."""
    short_seq_prob: float = 0.1
    """NSP only: probability of shortening an example to a random length (as BERT's data generation)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mlm.mask_prob={self.mask_prob} must be in (0, 1), e.g. 0.15")
        for key in ("mask_token_ratio", "random_token_ratio", "short_seq_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"mlm.{key}={getattr(self, key)} must be in [0, 1]")
        if self.mask_token_ratio + self.random_token_ratio > 1.0:
            raise ConfigError(f"mlm.mask_token_ratio + mlm.random_token_ratio = "
                              f"{self.mask_token_ratio + self.random_token_ratio} exceeds 1 (BERT: 0.8 + 0.1)")


@dataclass(frozen=True, eq=False)
class MLMVocab:
    """The token ids masking needs: roles, all special ids and the ids random replacement draws from."""

    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    special_ids: tuple[int, ...]
    random_ids: torch.Tensor  # int64 [K]: the non-special vocabulary

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "MLMVocab":
        """Roles from a :class:`~lmforge.core.tokenizer.Tokenizer`; a missing [MASK]/[CLS]/[SEP] is a
        ``DataError`` (a missing [PAD] falls back to [SEP]: padded positions are never attended)."""
        for role, spelling in (("mask", "[MASK]"), ("cls", "[CLS]"), ("sep", "[SEP]")):
            if getattr(tokenizer, f"{role}_id") is None:
                raise DataError(f"the tokenizer has no {spelling} token ({role}_token), which masked-LM training "
                                f"needs; train it with special_tokens including [PAD] [UNK] [CLS] [SEP] [MASK] "
                                f"or set {role}_token in its tokenizer_config.json")
        roles = [tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id]
        special = sorted({*tokenizer.special_ids, *(r for r in roles if r is not None)})
        return cls.build(tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id,
                         tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.sep_id,
                         special, tokenizer.vocab_size)

    @classmethod
    def build(cls, cls_id: int, sep_id: int, mask_id: int, pad_id: int, special_ids: Sequence[int],
              vocab_size: int) -> "MLMVocab":
        special = tuple(sorted({int(i) for i in special_ids} | {cls_id, sep_id, mask_id, pad_id}))
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[[i for i in special if i < vocab_size]] = False
        random_ids = keep.nonzero().squeeze(1)
        if random_ids.numel() == 0:
            raise DataError(f"the vocabulary of {vocab_size} ids has no non-special token to mask or sample")
        return cls(cls_id, sep_id, mask_id, pad_id, special, random_ids)

    def is_special(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(ids, torch.tensor(self.special_ids, dtype=ids.dtype, device=ids.device))


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, vocab: MLMVocab, cfg: MLMConfig,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``input_ids [B, T]`` at the positions where ``maskable [B, T]`` is True.

    Returns ``(masked_ids, labels)``.  The random draws have fixed shapes (independent of the content),
    so the generator advances identically for any batch of the same shape.
    """
    B, T = input_ids.shape
    n = maskable.sum(1)  # [B]
    k = torch.floor(cfg.mask_prob * n + torch.rand(B, generator=generator, dtype=torch.float64)).long()
    k = torch.minimum(k.clamp(min=1), n)
    scores = torch.rand(B, T, generator=generator).masked_fill_(~maskable, 2.0)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # rank of each position's score in its row
    selected = (ranks < k[:, None]) & maskable
    u = torch.rand(B, T, generator=generator)
    replacement = vocab.random_ids[torch.randint(len(vocab.random_ids), (B, T), generator=generator)]
    to_mask = selected & (u < cfg.mask_token_ratio)
    to_random = selected & (u >= cfg.mask_token_ratio) & (u < cfg.mask_token_ratio + cfg.random_token_ratio)
    out = input_ids.masked_fill(to_mask, vocab.mask_id)
    out = torch.where(to_random, replacement, out)
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    return out, labels


def _finish(batch: dict[str, torch.Tensor], vocab: MLMVocab, cfg: MLMConfig,
            generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Mask a batch of ``[CLS] ... [SEP]`` rows in place of its ``input_ids``; add ``labels`` (and
    ``nsp_scale`` = masked tokens / rows of this whole batch, see the module docstring)."""
    ids = batch["input_ids"]
    maskable = ~vocab.is_special(ids)
    if "attention_mask" in batch:
        maskable &= batch["attention_mask"].bool()
    batch["input_ids"], batch["labels"] = mask_tokens(ids, maskable, vocab, cfg, generator)
    if "next_sentence_label" in batch:
        masked = int((batch["labels"] != IGNORE_INDEX).sum())
        batch["nsp_scale"] = torch.full((ids.shape[0],), masked / ids.shape[0], dtype=torch.float32)
    return batch


def collate_texts(seqs: Sequence[Sequence[int]], vocab: MLMVocab, cfg: MLMConfig, generator: torch.Generator,
                  max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Token-id lists (content only) -> masked ``[CLS] ids [SEP]`` rows, right-padded, with
    ``attention_mask``.  A text with no maskable token is a ``DataError`` naming it."""
    if len(seqs) == 0:
        raise DataError("no texts to collate; give at least one")
    rows = []
    for i, s in enumerate(seqs):
        s = torch.as_tensor(list(s), dtype=torch.long)
        s = s[:max_len - 2] if max_len is not None else s
        if s.numel() == 0 or bool(vocab.is_special(s).all()):
            raise DataError(f"text {i} has no token that can be masked (it is empty or all special tokens"
                            f"{'' if max_len is None else f' within max_len {max_len}'}); drop it or give it text")
        rows.append(torch.cat([torch.tensor([vocab.cls_id]), s, torch.tensor([vocab.sep_id])]))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), vocab.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return _finish({"input_ids": ids, "attention_mask": mask}, vocab, cfg, generator)


class MLMBatchSource:
    """Batch source of masked-LM (+NSP) examples from a token stream and its document offsets.

    ``next_batch(n)`` -> ``input_ids``, ``labels`` ``[n, seq_len]`` (+ ``attention_mask``,
    ``token_type_ids``, ``next_sentence_label [n]``, ``nsp_scale [n]`` with NSP).  Deterministic for a
    seed; ``state_dict`` holds the position and the masking generator's state, so resume is exact.
    """

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, seq_len: int, vocab: MLMVocab,
                 config: MLMConfig | None = None, seed: int = 0, shuffle: bool = True) -> None:
        self.cfg = config or MLMConfig()
        self.vocab, self.seq_len, self.seed, self.shuffle = vocab, int(seq_len), int(seed), bool(shuffle)
        need = 5 if self.cfg.nsp else 3
        if self.seq_len < need:
            form = "[CLS] A [SEP] B [SEP]" if self.cfg.nsp else "[CLS] tokens [SEP]"
            raise ConfigError(f"seq_len {seq_len} is too short for masked-LM examples: {form} needs at least {need}")
        self.generator = torch.Generator().manual_seed(self.seed)
        if self.cfg.nsp:
            self.pairs = SentencePairs(tokens, doc_offsets, self.seq_len, vocab.cls_id, vocab.sep_id, vocab.pad_id,
                                       vocab.special_ids, self.cfg.short_seq_prob, seed=self.seed, shuffle=self.shuffle)
            self.num_examples, self.stats = self.pairs.num_examples, self.pairs.stats
        else:
            self.windows = PackedWindows(tokens, self.seq_len - 2, seed=self.seed, shuffle=self.shuffle)
            self.num_examples = self.windows.num_windows
            self.stats = {"documents": len(doc_offsets) - 1, "documents_skipped": 0,
                          "examples_per_epoch": self.num_examples}

    @classmethod
    def from_shards(cls, shards: Any, split: str, tokenizer: Any, seq_len: int, config: MLMConfig | None = None,
                    seed: int = 0, shuffle: bool = True) -> "MLMBatchSource":
        """From a :class:`~lmforge.data.shards.ShardSet` split and the tokenizer it was made with."""
        return cls(shards.tokens(split), shards.doc_offsets(split), seq_len, MLMVocab.from_tokenizer(tokenizer),
                   config, seed, shuffle)

    def _window_rows(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[CLS] window [SEP]`` rows of packed stream windows ``[n, seq_len - 2]``."""
        n = windows.shape[0]
        ids = torch.cat([torch.full((n, 1), self.vocab.cls_id), windows, torch.full((n, 1), self.vocab.sep_id)], 1)
        return {"input_ids": ids}

    # ------------------------------------------------------------------ batch source contract
    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        """The next ``n`` examples (crossing into the next epoch when one ends), freshly masked."""
        if int(n) < 1:
            raise ConfigError(f"batch size {n} must be >= 1")
        if not self.cfg.nsp:
            rows = self._window_rows(self.windows.next_batch(int(n))["input_ids"])
        else:
            rows = self.pairs.next_rows(int(n), self.generator)
        return _finish(rows, self.vocab, self.cfg, self.generator)

    def state_dict(self) -> dict[str, Any]:
        pos = self.windows.state_dict() if not self.cfg.nsp else self.pairs.state_dict()
        return {"nsp": bool(self.cfg.nsp), "seed": self.seed, "seq_len": self.seq_len,
                "num_examples": int(self.num_examples), "position": pos, "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at a saved position with the saved masking generator state."""
        for key in ("nsp", "seed", "seq_len", "num_examples", "position", "generator"):
            if key not in sd:
                raise RunError(f"data loader state lacks '{key}'; the checkpoint is not from MLMBatchSource")
        for key, mine in (("nsp", bool(self.cfg.nsp)), ("seq_len", self.seq_len), ("num_examples", self.num_examples)):
            if sd[key] != mine:
                raise RunError(f"cannot resume: the checkpoint's masked-LM data had {key}={sd[key]}, this run has "
                               f"{mine}; resume with the same data, tokenizer and settings or start a new run")
        self.seed = int(sd["seed"])
        if self.cfg.nsp:
            self.pairs.seed = self.seed
            self.pairs.load_state_dict(sd["position"])
        else:
            self.windows.load_state_dict(sd["position"])
        self.generator.set_state(torch.as_tensor(sd["generator"], dtype=torch.uint8))

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Examples in stored order with fixed masks (a generator seeded afresh on each call), ``batch_size``
        at a time; does not move the training position or generator."""
        if int(batch_size) < 1:
            raise ConfigError(f"batch size {batch_size} must be >= 1")
        g = torch.Generator().manual_seed(self.seed + _VAL_SEED)
        if not self.cfg.nsp:
            for b in self.windows.val_batches(batch_size, max_batches):
                yield _finish(self._window_rows(b["input_ids"]), self.vocab, self.cfg, g)
            return
        total = self.num_examples if max_batches is None else min(self.num_examples, int(max_batches) * int(batch_size))
        for start in range(0, total, int(batch_size)):
            rows = self.pairs.rows(np.arange(start, min(start + int(batch_size), total)), g)
            yield _finish(rows, self.vocab, self.cfg, g)

    def __len__(self) -> int:
        return self.num_examples


class MLMObjective(Objective):
    """Masked-LM loss (+ NSP when the batch has ``next_sentence_label``) on an
    :class:`~lmforge.models.encoder.EncoderLM`; see the module docstring for the normalisation."""

    def __init__(self, vocab: MLMVocab | None = None, config: MLMConfig | None = None, seed: int = 0,
                 ignore_index: int = IGNORE_INDEX) -> None:
        self.vocab, self.cfg, self.ignore_index = vocab, config or MLMConfig(), ignore_index
        self._generator = torch.Generator().manual_seed(int(seed))

    def collate(self, raw: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Token-id lists -> a masked batch (:func:`collate_texts`; no NSP).  Pretraining batches come from
        :class:`MLMBatchSource`, whose masking generator is resumable; this one is not."""
        if self.vocab is None:
            raise ConfigError("MLMObjective.collate needs the vocabulary: "
                              "MLMObjective(vocab=MLMVocab.from_tokenizer(tokenizer))")
        return collate_texts(raw, self.vocab, self.cfg, self._generator)

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != self.ignore_index).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       token_type_ids=batch.get("token_type_ids"))  # [B, T, d]
        labels = batch["labels"]
        selected = labels != self.ignore_index
        logits = model.mlm_logits(hidden, selected).float()  # [N, V], only at the targets
        target = labels[selected]
        loss_sum = F.cross_entropy(logits, target, reduction="sum")
        metrics = {"mlm_loss": loss_sum.detach(), "mlm_acc": (logits.argmax(-1) == target).sum()}
        if "next_sentence_label" in batch:
            nsp_logits = model.nsp_logits(model.pooled(hidden)).float()  # [B, 2]
            y, scale = batch["next_sentence_label"], batch["nsp_scale"]
            nsp_sum = (F.cross_entropy(nsp_logits, y, reduction="none") * scale).sum()
            loss_sum = loss_sum + nsp_sum
            metrics["nsp_loss"] = nsp_sum.detach()
            metrics["nsp_acc"] = ((nsp_logits.argmax(-1) == y).float() * scale).sum()
        return ObjectiveOutput(loss_sum=loss_sum, count=selected.sum(), metrics=metrics)

