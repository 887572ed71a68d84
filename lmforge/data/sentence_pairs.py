"""Sentence pairs for next-sentence prediction: ``[CLS] A [SEP] B [SEP]`` rows cut from documents (BERT).

This is sampling from data -- which tokens of which documents form an example -- and knows nothing of masking
or losses; the masked-LM objective's batch source (``MLMBatchSource`` in ``objectives/mlm.py``) masks these rows.

Each document's content (the shards' BOS/EOS/SEP markers stripped) is cut into consecutive chunks of
``seq_len - 3`` tokens; a chunk is one example per epoch (chunks shuffled per epoch by ``(seed, epoch)``, like
:class:`~lmforge.data.loader.PackedWindows`).  For an example: with probability ``short_seq_prob`` the chunk is
shortened to a random length >= 2 (BERT's short sequences); segment A is the chunk's first ``a`` tokens, ``a``
uniform in ``[1, len - 1]``; with probability 1/2 segment B is the rest of the chunk (label 0, IsNext -- HF's
convention), else a span of the same length at a random place in another, uniformly chosen document (label 1;
the chunk's remaining tokens are then unused this epoch -- the next epoch cuts the chunk anew).  Input
``[CLS] A [SEP] B [SEP]``, ``token_type_ids`` 0 up to the first [SEP] and 1 after, right-padded to ``seq_len``.
Documents with fewer than 2 content tokens cannot give a pair: they are skipped and counted (``stats``); a
1-token tail chunk is dropped.

The random draws come from a ``torch.Generator`` the caller passes (the masking that follows draws from the
same one, and the caller saves its state), six uniforms per row whatever the content.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from lmforge.core.errors import DataError


class SentencePairs:
    """The NSP examples of a token stream and its document offsets, in a resumable per-epoch order."""

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, seq_len: int, cls_id: int, sep_id: int,
                 pad_id: int, special_ids: Sequence[int], short_seq_prob: float = 0.1, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, int(seq_len), int(seed), bool(shuffle)
        self.cls_id, self.sep_id, self.pad_id, self.short_seq_prob = cls_id, sep_id, pad_id, short_seq_prob
        self._build_chunks(np.asarray(doc_offsets, dtype=np.int64), np.asarray(special_ids, dtype=np.int64))
        self.epoch = self.index = 0
        self._order_epoch: int | None = None
        self._order = np.zeros(0, dtype=np.int64)

    def _build_chunks(self, offsets: np.ndarray, special: np.ndarray) -> None:
        """Document content spans (boundary specials trimmed) cut into ``seq_len - 3``-token chunks."""
        starts, ends = offsets[:-1].copy(), offsets[1:].copy()
        nonempty = ends > starts
        starts[nonempty] += np.isin(self.tokens[starts[nonempty]], special)  # leading BOS
        nonempty = ends > starts
        ends[nonempty] -= np.isin(self.tokens[ends[nonempty] - 1], special)  # trailing EOS/SEP
        ok = ends - starts >= 2
        self.stats = {"documents": len(starts), "documents_skipped": int((~ok).sum())}
        if int(ok.sum()) < 2:
            raise DataError(f"next-sentence pairs need at least 2 documents of 2+ tokens; these data have "
                            f"{int(ok.sum())} of {len(starts)} documents; use more data or set mlm.nsp=false")
        self.doc_start, self.doc_end = starts[ok], ends[ok]
        M = self.seq_len - 3
        n_chunks = -(-(self.doc_end - self.doc_start) // M)
        doc = np.repeat(np.arange(len(self.doc_start)), n_chunks)
        first = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        c_start = self.doc_start[doc] + (np.arange(len(doc)) - first) * M
        c_end = np.minimum(c_start + M, self.doc_end[doc])
        keep = c_end - c_start >= 2
        self.chunk_start, self.chunk_end, self.chunk_doc = c_start[keep], c_end[keep], doc[keep]
        self.num_examples = int(keep.sum())
        self.stats["examples_per_epoch"] = self.num_examples

    def rows(self, chunks: np.ndarray, g: torch.Generator) -> dict[str, torch.Tensor]:
        """``[CLS] A [SEP] B [SEP]`` rows for the given chunk indices (see the module docstring)."""
        n, T = len(chunks), self.seq_len
        u = torch.rand(n, 6, generator=g, dtype=torch.float64).numpy()  # all draws up front, fixed shape
        ids = np.full((n, T), self.pad_id, dtype=np.int64)
        types = np.zeros((n, T), dtype=np.int64)
        mask = np.zeros((n, T), dtype=np.int64)
        label = (u[:, 0] < 0.5).astype(np.int64)  # 1 = random B
        n_docs = len(self.doc_start)
        for r, c in enumerate(chunks):
            s, d = int(self.chunk_start[c]), int(self.chunk_doc[c])
            length = int(self.chunk_end[c]) - s
            if length > 2 and u[r, 1] < self.short_seq_prob:
                length = 2 + int(u[r, 2] * (length - 1))  # uniform in [2, length]
            a = 1 + int(u[r, 3] * (length - 1))  # uniform in [1, length - 1]
            seg_a = self.tokens[s:s + a]
            if label[r] == 0:
                seg_b = self.tokens[s + a:s + length]
            else:
                other = int(u[r, 4] * (n_docs - 1))
                other += other >= d  # uniform over the other documents
                ds, de = int(self.doc_start[other]), int(self.doc_end[other])
                start = ds + int(u[r, 5] * max(1, de - ds - (length - a) + 1))
                seg_b = self.tokens[start:min(start + length - a, de)]
            na, nb = len(seg_a), len(seg_b)
            ids[r, 0], ids[r, 1:1 + na], ids[r, 1 + na] = self.cls_id, seg_a, self.sep_id
            ids[r, 2 + na:2 + na + nb], ids[r, 2 + na + nb] = seg_b, self.sep_id
            types[r, 2 + na:3 + na + nb] = 1
            mask[r, :3 + na + nb] = 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "token_type_ids": torch.from_numpy(types), "next_sentence_label": torch.from_numpy(label)}

    def order(self, epoch: int) -> np.ndarray:
        """Chunk order of an epoch: a permutation from ``(seed, epoch)`` (identity without shuffle)."""
        if self._order_epoch != epoch:
            self._order = (np.random.Generator(np.random.PCG64([self.seed, int(epoch)])).permutation(self.num_examples)
                           if self.shuffle else np.arange(self.num_examples))
            self._order_epoch = epoch
        return self._order

    def next_rows(self, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        """The rows of the next ``n`` examples of the training order, crossing into the next epoch when one ends."""
        parts, need = [], int(n)
        while need > 0:
            take = min(need, self.num_examples - self.index)
            parts.append(self.order(self.epoch)[self.index:self.index + take])
            self.index, need = self.index + take, need - take
            if self.index >= self.num_examples:
                self.epoch, self.index = self.epoch + 1, 0
        return self.rows(np.concatenate(parts), g)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.index, self._order_epoch = int(sd["epoch"]), int(sd["index"]), None
