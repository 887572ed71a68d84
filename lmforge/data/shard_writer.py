"""Writing token shards: documents in chunks, tokenised in order (a helper thread on the Rust batch path, or a
process pool), packed into one stream with BOS/EOS, each document assigned to ``train`` or ``val`` by a hash of
its index (:func:`val_mask`), and appended to ``{split}-NNNNN.bin`` files.

:func:`lmforge.data.shards.build_shards` drives these pieces and writes the manifest; the directory layout is
described in :mod:`lmforge.data.shards`.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from lmforge.core.tokenizer import Tokenizer

_CHUNK_DOCS = 2048
_CHUNK_BYTES = 8 << 20
_MASK64 = (1 << 64) - 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def val_mask(doc_indices: np.ndarray, seed: int, val_fraction: float) -> np.ndarray:
    """True for the documents (by index in the source) that belong to the validation split.

    A splitmix64 hash of (index, seed) mapped to [0, 1) and compared with ``val_fraction``.
    """
    if val_fraction <= 0:
        return np.zeros(len(doc_indices), dtype=bool)
    salt = np.uint64((int(seed) * 0xD1B54A32D192ED03 + 0x9E3779B97F4A7C15) & _MASK64)
    z = doc_indices.astype(np.uint64) ^ salt
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < val_fraction


def _chunks(docs: Iterable[str], max_docs: int = _CHUNK_DOCS, max_bytes: int = _CHUNK_BYTES) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if len(chunk) >= max_docs or size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _pack(ids: list[list[int]], bos: int | None, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Flatten token lists into one int64 array with [BOS] ids EOS per document; also the lengths."""
    extra = 1 + (bos is not None)
    raw_lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    lens = raw_lens + extra
    total = int(lens.sum())
    out = np.empty(total, dtype=np.int64)
    ends = np.cumsum(lens)
    special = np.zeros(total, dtype=bool)
    special[ends - 1] = True
    out[ends - 1] = eos
    if bos is not None:
        starts = ends - lens
        special[starts] = True
        out[starts] = bos
    n_raw = int(raw_lens.sum())
    if n_raw:
        out[~special] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=n_raw)
    return out, lens


_WORKER_TOKENIZER = None  # set in each worker process of a num_workers >= 2 build


def _encode_worker_init(tok_json: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = HFTokenizer.from_str(tok_json)


def _encode_worker(docs: list[str]) -> list[list[int]]:
    return [e.ids for e in _WORKER_TOKENIZER.encode_batch(docs, add_special_tokens=False)]


class _Encoder:
    """Encode chunks of documents in order, overlapping reading with encoding.

    ``num_workers`` None or 1: the Rust batch path in a helper thread (tokenizers releases the GIL and
    uses all cores).  ``num_workers >= 2``: that many worker processes, each encoding whole chunks.
    """

    def __init__(self, tokenizer: Tokenizer, num_workers: int | None):
        self.tokenizer = tokenizer
        self.num_workers = num_workers
        self._pool = None
        self._threads = None
        if num_workers is not None and num_workers >= 2:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self._pool = ctx.Pool(num_workers, initializer=_encode_worker_init,
                                  initargs=(tokenizer.hf.to_str(),))
        else:
            self._threads = ThreadPoolExecutor(max_workers=1)

    def map(self, chunks: Iterator[list[str]]) -> Iterator[tuple[list[str], list[list[int]]]]:
        depth = 2 * self.num_workers if self._pool is not None else 2
        pending: deque = deque()
        for chunk in chunks:
            if self._pool is not None:
                pending.append((chunk, self._pool.apply_async(_encode_worker, (chunk,))))
            else:
                pending.append((chunk, self._threads.submit(self.tokenizer.encode_batch, chunk, False)))
            if len(pending) >= depth:
                done_chunk, fut = pending.popleft()
                yield done_chunk, fut.get() if self._pool is not None else fut.result()
        while pending:
            done_chunk, fut = pending.popleft()
            yield done_chunk, fut.get() if self._pool is not None else fut.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
        if self._threads is not None:
            self._threads.shutdown(wait=True)


class _SplitWriter:
    """Appends whole documents to ``{split}-NNNNN.bin`` files of about ``shard_tokens`` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.dir, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[list[Any]] = []  # [file name, num_tokens]
        self._fh = None
        self.num_tokens = 0
        self.num_bytes = 0
        self.doc_lens: list[np.ndarray] = []
        self.doc_ids: list[np.ndarray] = []
        self.last_doc_bytes = 0

    def _new_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append([name, 0])
        self._fh = open(self.dir / name, "wb")

    def add(self, tokens: np.ndarray, lens: np.ndarray, ids: np.ndarray, doc_bytes: np.ndarray) -> None:
        if len(lens) == 0:
            return
        self.doc_lens.append(lens)
        self.doc_ids.append(ids)
        self.num_bytes += int(doc_bytes.sum())
        self.last_doc_bytes = int(doc_bytes[-1])
        tokens = tokens.astype(self.dtype, copy=False)
        ends = np.cumsum(lens)
        pos, doc = 0, 0
        while doc < len(lens):
            if not self.shards:
                self._new_shard()
            filled = self.shards[-1][1]
            room = self.shard_tokens - filled
            # Documents doc..last-1 fit in the room left in this shard.
            last = int(np.searchsorted(ends, pos + room, side="right")) if room > 0 else doc
            if last <= doc:
                if filled > 0:
                    self._new_shard()
                    continue
                last = doc + 1  # a document longer than shard_tokens gets a shard of its own
            end = int(ends[last - 1])
            self._fh.write(tokens[pos:end].tobytes())
            self.shards[-1][1] += end - pos
            self.num_tokens += end - pos
            pos, doc = end, last

    def pop_last_doc(self) -> tuple[np.ndarray, int, int]:
        """Remove the last document (it lies wholly in the last shard): (tokens, doc id, utf-8 bytes)."""
        self._fh.flush()
        lens = np.concatenate(self.doc_lens)
        ids = np.concatenate(self.doc_ids)
        n = int(lens[-1])
        name, count = self.shards[-1]
        path = self.dir / name
        with open(path, "rb") as fh:
            fh.seek((count - n) * self.dtype.itemsize)
            data = np.fromfile(fh, dtype=self.dtype, count=n)
        self._fh.close()
        self._fh = None
        os.truncate(path, (count - n) * self.dtype.itemsize)
        self.shards[-1][1] = count - n
        if count - n == 0:
            path.unlink()
            self.shards.pop()
        self.doc_lens, self.doc_ids = [lens[:-1]], [ids[:-1]]
        self.num_tokens -= n
        self.num_bytes -= self.last_doc_bytes
        if self.shards:
            self._fh = open(self.dir / self.shards[-1][0], "ab")
        return data, int(ids[-1]), self.last_doc_bytes

    @property
    def num_docs(self) -> int:
        return int(sum(len(x) for x in self.doc_lens))

    def finish(self) -> dict[str, Any]:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        lens = np.concatenate(self.doc_lens) if self.doc_lens else np.zeros(0, dtype=np.int64)
        ids = np.concatenate(self.doc_ids) if self.doc_ids else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        np.save(self.dir / f"{self.split}.offsets.npy", offsets)
        np.save(self.dir / f"{self.split}.doc_ids.npy", ids.astype(np.int64))
        return {
            "num_tokens": int(self.num_tokens),
            "num_docs": int(len(lens)),
            "num_bytes": int(self.num_bytes),
            "doc_offsets": f"{self.split}.offsets.npy",
            "doc_ids": f"{self.split}.doc_ids.npy",
            "shards": [{"file": name, "num_tokens": int(n)} for name, n in self.shards],
        }
