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
renamed into place.  The writing pieces (chunking, encoding, packing, the split writers) are in
:mod:`lmforge.data.shard_writer`; this module holds the reader (:class:`ShardSet`) and the driver.

:func:`train_tokenizer` (train a byte-level BPE on a data spec and save it) lives here too: it is the
data layer's bridge between sources and :class:`lmforge.core.tokenizer.Tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import atomic_write_json
from lmforge.core.outputs import check_output_dir, write_marker
from lmforge.core.tokenizer import Tokenizer
from lmforge.data.readers import DEFAULT_TXT_SPLIT
from lmforge.data.shard_writer import _chunks, _Encoder, _pack, _SplitWriter, token_dtype, val_mask
from lmforge.data.sources import WORLD_BYTES, cache_root, describe_source, iter_documents, source_hash

FORMAT = "lmforge-shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 1 << 30  # ~1G tokens per file (2 GB as uint16)
SPLITS = ("train", "val")


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
SHARD_DIR_NAME = re.compile(r"[0-9a-f]{16}-[0-9a-f]{16}-[0-9a-f]{8}")
"""The names :func:`shard_dir_name` gives (``lmforge cache`` recognises shard dirs by it and their manifest)."""
BUILDING_NAME = re.compile(r"\.(?P<name>[0-9a-f]{16}-[0-9a-f]{16}-[0-9a-f]{8})\.(?P<pid>\d+)\.\d+\.tmp")
"""A shard dir being built (by process ``pid``): :func:`build_shards`'s temporary name."""


def shard_dir_name(src_hash: str, fingerprint: str, settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True).encode()
    return f"{src_hash[:16]}-{fingerprint[:16]}-{hashlib.sha256(blob).hexdigest()[:8]}"


def build_shards(spec: str | os.PathLike, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None,
                 field: str = "text", val_fraction: float = 0.01, num_workers: int | None = None,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, *, seed: int = 0, max_docs: int | None = None,
                 world_bytes: int = WORLD_BYTES, rebuild: bool = False, txt_split: str = DEFAULT_TXT_SPLIT
                 ) -> ShardSet:
    """Tokenise ``spec`` into train/val shards under ``cache_dir`` (default ``$LMFORGE_CACHE/shards``),
    or reuse them if these inputs were tokenised before (``result.reused``).

    ``val_fraction``: share of documents for validation, chosen by a hash of (document index, ``seed``).
    ``num_workers``: None/1 = the tokenizer's Rust thread pool; N >= 2 = N worker processes.
    ``shard_tokens``: soft size limit of one shard file.  ``max_docs``: read only the first documents.
    ``rebuild``: tokenise again even when cached shards exist.  ``txt_split``: how ``.txt`` files become
    documents (:data:`lmforge.data.readers.TXT_SPLITS`; part of the cache key, as it changes the documents).
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
                "max_docs": max_docs, "shard_tokens": int(shard_tokens), "eos_id": sep, "bos_id": bos,
                "txt_split": txt_split}
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
        docs = iter_documents(spec, field, max_docs, txt_split=txt_split, world_bytes=world_bytes)
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
            "source": {"spec": os.fspath(spec), "hash": src_hash, "field": field, "txt_split": txt_split,
                       "kind": described["kind"],
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
                    model_max_length: int | None = None, overwrite: bool = True,
                    kind: str = "tokenizer", txt_split: str = DEFAULT_TXT_SPLIT) -> Tokenizer:
    """Train a byte-level BPE on the documents of ``data_spec`` and save it to ``out_dir``.

    ``max_bytes`` caps the UTF-8 text read for training (documents are taken in order until the cap is
    reached).  What ``lmforge tokenizer train --data PATH --vocab-size N --out DIR`` runs; there
    ``overwrite=False`` (no ``--force``) refuses an ``out_dir`` that holds files, before any training.  A model
    dir is refused always: its tokenizer belongs to its weights.  ``out_dir`` gets the ``lmforge.json`` marker of
    ``kind`` (a run's own tokenizer: ``run-tokenizer``).
    """
    if max_bytes is not None and int(max_bytes) <= 0:
        raise ConfigError(f"max_bytes {max_bytes} must be > 0 (or unset to read all the data)")
    out = Path(out_dir)
    if (out / "config.json").is_file():
        raise ConfigError(f"--out '{out}' is a model directory (config.json): a new tokenizer there would no longer "
                          f"match the model's embeddings; write the tokenizer to a new directory")
    check_output_dir(out, force=overwrite, what=f"--out '{out}'")

    def texts() -> Iterator[str]:
        used = 0
        for doc in iter_documents(data_spec, field, txt_split=txt_split, world_bytes=world_bytes):
            yield doc
            used += len(doc.encode("utf-8"))
            if max_bytes is not None and used >= max_bytes:
                return

    tok = Tokenizer.train(texts(), vocab_size, special_tokens=special_tokens, min_frequency=min_frequency,
                          model_max_length=model_max_length)
    tok.save(out)
    write_marker(out, kind, ["tokenizer.json", "tokenizer_config.json"])
    return tok
