"""Token shards: a data source tokenised once into memory-mapped token files, cached by content.

:func:`build_shards` reads the documents of a data spec (see :mod:`lmforge.data.sources`), tokenises
them (the Rust batch path of ``tokenizers``, parallel over cores, or a process pool), appends EOS after
every document (and puts BOS in front when the tokenizer itself adds BOS, as Llama's does) and writes
two token streams, ``train`` and ``val``.  A document goes to ``val`` when a hash of its index and
``seed`` falls below ``val_fraction`` -- deterministic, independent of chunking and worker count, and
no document is ever in both splits.  (If that picks no document at all but ``val_fraction > 0``, the
last document goes to ``val`` so the split is never empty.)

Layout of a shard directory::

    manifest.json                  written last: its presence means the directory is complete
    train-00000.bin ...            raw token ids (uint16 when the vocabulary fits, else uint32)
    train.offsets.npy              int64 [num_docs + 1]: start of each document in the split's stream
    train.doc_ids.npy              int64 [num_docs]: index of each document in the source
    val-00000.bin, val.offsets.npy, val.doc_ids.npy

Documents never cross shard files; a split's stream is its shards concatenated.  The directory is
``CACHE/{source_hash[:16]}-{tokenizer_fingerprint[:16]}-{settings_hash[:8]}``, so the same data,
tokenizer and settings reuse it without tokenising again.  It is built under a temporary name and
renamed into place.

:func:`train_tokenizer` (train a byte-level BPE on a data spec and save it) lives here too: it is the
data layer's bridge between sources and :class:`lmforge.core.tokenizer.Tokenizer`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import atomic_write_json
from lmforge.core.tokenizer import Tokenizer
from lmforge.data.sources import WORLD_BYTES, cache_root, describe_source, iter_documents, source_hash

FORMAT = "lmforge-shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 30  # ~1G tokens per file (2 GB as uint16)
SPLITS = ("train", "val")
_CHUNK_DOCS = 2048
_CHUNK_BYTES = 8 << 20
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------- helpers
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
    from tokenizers import Tokenizer as HFTokenizer

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
            import multiprocessing as mp

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


# ---------------------------------------------------------------------------------------- ShardSet
class ShardSet:
    """A directory of token shards (see the module docstring); arrays are read-only memory maps."""

    def __init__(self, path: Path, manifest: dict[str, Any], reused: bool = False):
        self.path = Path(path)
        self.manifest = manifest
        self.reused = reused  # True when build_shards found the shards already built
        self.dtype = np.dtype(manifest["dtype"])
        self._cache: dict[str, list[np.ndarray]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> "ShardSet":
        """Open a shard directory; with ``tokenizer``, check it is the one the shards were made with."""
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            what = "does not exist" if not path.exists() else "has no manifest.json (incomplete or not shards)"
            raise DataError(f"shard directory '{path}' {what}; build it with build_shards / 'lmforge data prepare'")
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"'{mf}' is not valid JSON ({e}); delete '{path}' and build the shards again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(f"'{mf}' is not an lmforge shard manifest; delete '{path}' and build the shards again")
        if manifest.get("version") != FORMAT_VERSION:
            raise DataError(f"shards in '{path}' have format version {manifest.get('version')}, this lmforge "
                            f"reads version {FORMAT_VERSION}; delete the directory and build them again")
        shards = cls(path, manifest)
        if tokenizer is not None:
            shards.check_tokenizer(tokenizer)
        return shards

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        want = self.manifest["tokenizer"]["fingerprint"]
        if tokenizer.fingerprint != want:
            raise DataError(f"shards in '{self.path}' were tokenised with tokenizer {want[:12]}, but the tokenizer "
                            f"given is {tokenizer.fingerprint[:12]}; use the matching tokenizer or rebuild the "
                            f"shards with this one")

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _split(self, split: str) -> dict[str, Any]:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise DataError(f"shards in '{self.path}' have no split '{split}'; splits: "
                            f"{', '.join(self.splits)}") from None

    def shards(self, split: str) -> list[np.ndarray]:
        """The split's shard files as read-only memmaps, in order."""
        if split not in self._cache:
            arrays = []
            for shard in self._split(split)["shards"]:
                f = self.path / shard["file"]
                if shard["num_tokens"] == 0:
                    arrays.append(np.zeros(0, dtype=self.dtype))
                    continue
                if not f.is_file() or f.stat().st_size != shard["num_tokens"] * self.dtype.itemsize:
                    raise DataError(f"shard file '{f}' is missing or has the wrong size; delete '{self.path}' "
                                    f"and build the shards again")
                arrays.append(np.memmap(f, dtype=self.dtype, mode="r", shape=(shard["num_tokens"],)))
            self._cache[split] = arrays
        return self._cache[split]

    def tokens(self, split: str) -> np.ndarray:
        """The split's token stream: a memmap when it is one shard file (the usual case), else the
        shards concatenated in memory (use :meth:`shards` to avoid the copy)."""
        arrays = self.shards(split)
        if len(arrays) == 1:
            return arrays[0]
        if not arrays:
            return np.zeros(0, dtype=self.dtype)
        return np.concatenate(arrays)

    def num_tokens(self, split: str) -> int:
        return int(self._split(split)["num_tokens"])

    def num_docs(self, split: str) -> int:
        return int(self._split(split)["num_docs"])

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's source text (for bits per byte); EOS/BOS are not text."""
        return int(self._split(split)["num_bytes"])

    def doc_offsets(self, split: str) -> np.ndarray:
        """int64 [num_docs + 1]: where each document starts in the split's stream (last = num_tokens)."""
        return np.load(self.path / self._split(split)["doc_offsets"])

    def doc_ids(self, split: str) -> np.ndarray:
        """int64 [num_docs]: each document's index in the source."""
        return np.load(self.path / self._split(split)["doc_ids"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def __repr__(self) -> str:
        parts = ", ".join(f"{s}={self.num_tokens(s)} tokens" for s in self.splits)
        return f"ShardSet('{self.path}', {parts})"


# ---------------------------------------------------------------------------------------- building
def shard_dir_name(src_hash: str, fingerprint: str, settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True).encode()
    return f"{src_hash[:16]}-{fingerprint[:16]}-{hashlib.sha256(blob).hexdigest()[:8]}"


def build_shards(spec: str | os.PathLike, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None,
                 field: str = "text", val_fraction: float = 0.01, num_workers: int | None = None,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, *, seed: int = 0, max_docs: int | None = None,
                 world_bytes: int = WORLD_BYTES, rebuild: bool = False) -> ShardSet:
    """Tokenise ``spec`` into train/val shards under ``cache_dir`` (default ``$LMFORGE_CACHE/shards``),
    or reuse them if these inputs were tokenised before (``result.reused``).

    ``val_fraction``: share of documents for validation, chosen by a hash of (document index, ``seed``).
    ``num_workers``: None/1 = the tokenizer's Rust thread pool; N >= 2 = N worker processes.
    ``shard_tokens``: soft size limit of one shard file.  ``max_docs``: read only the first documents.
    ``rebuild``: tokenise again even when cached shards exist.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction {val_fraction} must be in [0, 1) (e.g. 0.01 for 1% of documents)")
    if int(shard_tokens) < 1:
        raise ConfigError(f"shard_tokens {shard_tokens} must be >= 1")
    if num_workers is not None and int(num_workers) < 0:
        raise ConfigError(f"num_workers {num_workers} must be >= 0 (or None for the tokenizer's own threads)")
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    if sep is None:
        raise DataError("the tokenizer has no EOS (or SEP) token, which shards put after every document; set "
                        "eos_token in its tokenizer_config.json")
    bos = tokenizer.bos_id if tokenizer.adds_bos else None
    max_id = max(max(tokenizer.get_vocab().values(), default=0) + 1, tokenizer.vocab_size)
    dtype = token_dtype(max_id)

    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "shards"
    src_hash = source_hash(spec, field, world_bytes=world_bytes)
    settings = {"version": FORMAT_VERSION, "field": field, "val_fraction": float(val_fraction), "seed": int(seed),
                "max_docs": max_docs, "shard_tokens": int(shard_tokens), "eos_id": sep, "bos_id": bos}
    final = cache / shard_dir_name(src_hash, tokenizer.fingerprint, settings)
    if not rebuild and (final / "manifest.json").is_file():
        try:
            shards = ShardSet.load(final, tokenizer)
            shards.reused = True
            return shards
        except DataError:
            pass  # a broken cache entry: build it again below

    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{final.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    tmp.mkdir()
    encoder = None
    try:
        writers = {s: _SplitWriter(tmp, s, dtype, int(shard_tokens)) for s in SPLITS}
        encoder = _Encoder(tokenizer, num_workers)
        docs = iter_documents(spec, field, max_docs, world_bytes=world_bytes)
        next_index = 0
        for chunk, ids in encoder.map(_chunks(docs)):
            tokens, lens = _pack(ids, bos, sep)
            index = np.arange(next_index, next_index + len(chunk), dtype=np.int64)
            next_index += len(chunk)
            nbytes = np.fromiter((len(d.encode("utf-8")) for d in chunk), dtype=np.int64, count=len(chunk))
            is_val = val_mask(index, seed, float(val_fraction))
            token_is_val = np.repeat(is_val, lens)
            for split, doc_sel, tok_sel in (("train", ~is_val, ~token_is_val), ("val", is_val, token_is_val)):
                if doc_sel.any():
                    writers[split].add(tokens[tok_sel], lens[doc_sel], index[doc_sel], nbytes[doc_sel])
        encoder.close()
        encoder = None
        if val_fraction > 0 and writers["val"].num_docs == 0 and writers["train"].num_docs >= 2:
            data, doc_id, nb = writers["train"].pop_last_doc()
            writers["val"].add(data, np.array([len(data)]), np.array([doc_id]), np.array([nb]))
        split_info = {s: w.finish() for s, w in writers.items()}
        described = describe_source(spec, world_bytes=world_bytes)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                          "eos_id": sep, "bos_id": bos},
            "source": {"spec": os.fspath(spec), "hash": src_hash, "field": field, "kind": described["kind"],
                       "files": described["files"], "num_docs": next_index},
            "val_fraction": float(val_fraction),
            "seed": int(seed),
            "max_docs": max_docs,
            "shard_tokens": int(shard_tokens),
            "splits": split_info,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        if final.exists():
            if rebuild or not (final / "manifest.json").is_file():
                shutil.rmtree(final)
            else:  # another process finished the same shards first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return ShardSet.load(final, tokenizer)
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / "manifest.json").is_file():  # lost a race to an identical build
                shutil.rmtree(tmp, ignore_errors=True)
                return ShardSet.load(final, tokenizer)
            raise
    finally:
        if encoder is not None:
            encoder.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ShardSet(final, manifest, reused=False)


# ---------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(data_spec: str | os.PathLike, vocab_size: int, out_dir: str | os.PathLike,
                    special_tokens: list[str] | None = None, max_bytes: int | None = None, *,
                    field: str = "text", min_frequency: int = 2, world_bytes: int = WORLD_BYTES,
                    model_max_length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE on the documents of ``data_spec`` and save it to ``out_dir``.

    ``max_bytes`` caps the UTF-8 text read for training (documents are taken in order until the cap is
    reached).  What ``lmforge tokenizer train --data PATH --vocab-size N --out DIR`` runs.
    """
    if max_bytes is not None and int(max_bytes) <= 0:
        raise ConfigError(f"max_bytes {max_bytes} must be > 0 (or unset to read all the data)")

    def texts() -> Iterator[str]:
        used = 0
        for doc in iter_documents(data_spec, field, world_bytes=world_bytes):
            yield doc
            used += len(doc.encode("utf-8"))
            if max_bytes is not None and used >= max_bytes:
                return

    tok = Tokenizer.train(texts(), vocab_size, special_tokens=special_tokens, min_frequency=min_frequency,
                          model_max_length=model_max_length)
    tok.save(out_dir)
    return tok
