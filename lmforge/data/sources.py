"""Data sources: turn a data spec (a string) into a stream of text documents.

A spec is one of

* a file: ``.txt``, ``.jsonl``/``.json``, ``.csv``/``.tsv``, ``.parquet`` (``.gz`` versions of the
  text formats too);
* a folder: every supported file below it, recursively, in sorted order of relative path (hidden files
  and folders, and files of other types such as a README, are skipped);
* a glob pattern (``data/*.jsonl``, ``data/**/*.txt``): the matching supported files, sorted;
* a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (a folder holding
  ``dataset_info.json``/``state.json``, or ``dataset_dict.json`` for a DatasetDict, of which the
  ``train`` split is read unless the spec ends in ``::SPLIT``, e.g. ``data/my_ds::validation``);
* ``world`` or ``world:SEED``: the built-in synthetic world corpus (generated once into the cache,
  ``$LMFORGE_CACHE`` or ``~/.cache/lmforge``).  A file or folder literally named ``world`` is reached
  as ``./world``.

How each format becomes documents:

* ``.txt``: by ``txt_split`` (``data.txt_split`` in training configs, ``--txt-split`` of ``eval perplexity``):
  ``paragraph`` (training's default) -- documents are blocks of lines separated by one or more blank (empty or
  whitespace-only) lines, the lines of a block joined with ``\\n``, so a file with no blank line is one document;
  ``file`` (evaluation's default) -- the whole file is one document, exactly as written (newlines and blank lines
  kept); ``line`` -- every non-blank line is a document.
* ``.jsonl``: one JSON object per line, the document is its ``field`` (default ``text``); blank lines
  are skipped.  ``.json``: a JSON array of objects, or JSON lines.
* ``.csv``/``.tsv``: a header row, the document is column ``field``.
* ``.parquet`` and ``datasets``: column ``field``.

Documents that are empty or whitespace-only (and null values) are skipped.  Text is read as UTF-8
(a leading byte-order mark is dropped).  Every user mistake raises :class:`DataError` with a one-line
message naming the file, the line and the fix.  The per-format readers are in :mod:`lmforge.data.readers`.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import atomic_path
from lmforge.data import world
from lmforge.data.readers import DEFAULT_TXT_SPLIT, SUPPORTED_EXTS, TXT_SPLITS, file_ext, reader_for

WORLD_BYTES = 12_000_000
_SUPPORTED_LIST = ", ".join(SUPPORTED_EXTS) + ", a folder, a glob, a datasets save_to_disk folder or 'world'"


def cache_root() -> Path:
    """lmforge's cache directory: ``$LMFORGE_CACHE`` or ``~/.cache/lmforge``."""
    env = os.environ.get("LMFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmforge"


# ---------------------------------------------------------------------------------------- resolving
def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def _parse_world(spec: str) -> int | None:
    """``world`` -> 0, ``world:7`` -> 7, anything else -> None."""
    if spec == "world":
        return 0
    if spec.startswith("world:"):
        raw = spec[len("world:"):]
        try:
            seed = int(raw)
        except ValueError:
            raise DataError(f"data spec '{spec}': the world seed must be an integer (e.g. world:1)") from None
        if seed < 0:
            raise DataError(f"data spec '{spec}': the world seed must be >= 0")
        return seed
    return None


def world_path(seed: int = 0, world_bytes: int = WORLD_BYTES, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached built-in world corpus (JSONL, field ``text``) under ``CACHE/world/``, generating
    it if missing (``cache_dir`` defaults to :func:`cache_root`)."""
    root = (Path(cache_dir) if cache_dir is not None else cache_root()) / "world"
    path = Path(world.world_corpus_path(root, seed, world_bytes))
    if not path.is_file():
        with atomic_path(path) as tmp:
            world.write_corpus(tmp, seed=seed, target_bytes=world_bytes)
    return path


class _Resolved:
    """A resolved spec: kind ('files' | 'hf_dataset'), the files to read and the root they are named from."""

    def __init__(self, spec: str, kind: str, files: list[Path], root: Path, split: str | None = None,
                 dataset_dir: Path | None = None, world_seed: int | None = None):
        self.spec, self.kind, self.files, self.root = spec, kind, files, root
        self.split, self.dataset_dir, self.world_seed = split, dataset_dir, world_seed

    def rel(self, f: Path) -> str:
        try:
            return f.relative_to(self.root).as_posix()
        except ValueError:
            return f.name


def _walk(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            if not name.startswith(".") and file_ext(p) in SUPPORTED_EXTS:
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _resolve(spec: str | os.PathLike, world_bytes: int = WORLD_BYTES,
             cache_dir: str | os.PathLike | None = None) -> _Resolved:
    spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("empty data spec; pass a file, folder, glob, datasets folder or 'world'")
    seed = _parse_world(spec)
    if seed is not None:
        path = world_path(seed, world_bytes, cache_dir)
        return _Resolved(spec, "files", [path], path.parent, world_seed=seed)

    split = None
    path_str = spec
    if "::" in spec:
        path_str, split = spec.rsplit("::", 1)
        if not split:
            raise DataError(f"data spec '{spec}' ends in '::' without a split name (e.g. '{path_str}::train')")
    path = Path(path_str).expanduser()

    if any(c in path_str for c in "*?["):
        if split is not None:
            raise DataError(f"data spec '{spec}': '::{split}' selects a split of a datasets folder, not of a glob")
        matches = sorted(Path(m) for m in globlib.glob(os.path.expanduser(path_str), recursive=True))
        files: list[Path] = []
        for m in matches:
            if m.is_dir():
                continue
            if file_ext(m) in SUPPORTED_EXTS:
                files.append(m)
        if not files:
            what = f"matched {len(matches)} path(s) but no supported file" if matches else "matched no files"
            raise DataError(f"data pattern '{path_str}' {what}; supported: {', '.join(SUPPORTED_EXTS)}")
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
        return _Resolved(spec, "files", files, root)

    if not path.exists():
        raise DataError(f"data path '{path_str}' does not exist; pass a file, folder, glob or 'world' "
                        f"(supported files: {', '.join(SUPPORTED_EXTS)})")
    if _is_hf_dataset(path):
        return _resolve_hf(spec, path, split)
    if split is not None:
        raise DataError(f"data spec '{spec}': '::{split}' selects a split, but '{path_str}' is not a datasets "
                        f"save_to_disk folder")
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise DataError(f"data folder '{path_str}' holds no supported files; supported: "
                            f"{', '.join(SUPPORTED_EXTS)} (or a datasets save_to_disk folder)")
        return _Resolved(spec, "files", files, path)
    if file_ext(path) not in SUPPORTED_EXTS:
        raise DataError(f"data file '{path_str}' has unsupported type '{path.suffix or path.name}'; "
                        f"supported: {_SUPPORTED_LIST}")
    return _Resolved(spec, "files", [path], path.parent)


def _resolve_hf(spec: str, path: Path, split: str | None) -> _Resolved:
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file():
        try:
            splits = list(json.loads(dict_file.read_text(encoding="utf-8"))["splits"])
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"'{dict_file}' is not a valid datasets dataset_dict.json; re-save the dataset "
                            f"with save_to_disk") from None
        chosen = split or "train"
        if chosen not in splits:
            how = f"'{spec}' asks for split '{chosen}'" if split else f"'{spec}' has no 'train' split"
            raise DataError(f"datasets folder {how}; available splits: {', '.join(splits)} "
                            f"(pick one with '{path}::SPLIT')")
        ds_dir = path / chosen
        files = sorted((f for f in ds_dir.rglob("*") if f.is_file()), key=lambda f: f.relative_to(path).as_posix())
        return _Resolved(spec, "hf_dataset", files, path, split=chosen, dataset_dir=ds_dir)
    if split is not None:
        raise DataError(f"data spec '{spec}': '{path}' is a single datasets Dataset, not a DatasetDict; "
                        f"drop '::{split}'")
    files = sorted((f for f in path.rglob("*") if f.is_file()), key=lambda f: f.relative_to(path).as_posix())
    return _Resolved(spec, "hf_dataset", files, path, dataset_dir=path)


# ---------------------------------------------------------------------------------------- reading
# files: lmforge.data.readers (one reader per format); datasets folders here, beside their resolving
def _read_hf(res: _Resolved, field: str) -> Iterator[str]:
    try:
        import datasets  # optional: pip install -e ".[data]"
    except ImportError:
        raise DataError(f"'{res.spec}' is a Hugging Face datasets folder; install the library with "
                        f"'pip install datasets'") from None
    try:
        ds = datasets.load_from_disk(str(res.dataset_dir))
    except Exception as e:  # datasets raises many kinds for broken folders
        raise DataError(f"cannot load datasets folder '{res.dataset_dir}' ({str(e).splitlines()[0]}); "
                        f"re-save it with save_to_disk") from None
    if field not in ds.column_names:
        raise DataError(f"datasets folder '{res.dataset_dir}' has no column '{field}' (columns: "
                        f"{', '.join(ds.column_names)}); choose the text column with --field / data.field")
    ds = ds.select_columns([field])
    for batch in ds.iter(batch_size=1024):
        for value in batch[field]:
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"datasets folder '{res.dataset_dir}': column '{field}' holds "
                                f"{type(value).__name__} values, not strings; choose a text column")
            yield value


# ---------------------------------------------------------------------------------------- public API
def iter_documents(spec: str | os.PathLike, field: str = "text", max_docs: int | None = None, *,
                   txt_split: str = DEFAULT_TXT_SPLIT, world_bytes: int = WORLD_BYTES,
                   cache_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Yield the text documents of ``spec`` in a fixed order (see the module docstring).

    Raises :class:`DataError` when the spec does not exist, is malformed, or yields no document.
    ``max_docs`` stops after that many documents; ``txt_split`` cuts ``.txt`` files (``file``, ``paragraph``,
    ``line``: the module docstring); ``world_bytes``/``cache_dir`` size and place the built-in world corpus.  The spec is resolved (and missing paths reported) when this is called; format
    errors are raised while iterating, at the offending line.
    """
    if txt_split not in TXT_SPLITS:
        raise ConfigError(f"txt_split '{txt_split}' is not one of {', '.join(TXT_SPLITS)} (how a .txt file becomes "
                          f"documents: the whole file, its blank-line-separated paragraphs, or its lines)")
    res = _resolve(spec, world_bytes, cache_dir)
    return _iter_resolved(res, field, max_docs, txt_split)


def _iter_resolved(res: _Resolved, field: str, max_docs: int | None, txt_split: str) -> Iterator[str]:
    if max_docs is not None and max_docs <= 0:
        return
    count = 0
    if res.kind == "hf_dataset":
        streams = [_read_hf(res, field)]
    else:
        streams = (reader_for(f, txt_split)(f, field) for f in res.files)
    for stream in streams:
        for doc in stream:
            if not doc or doc.isspace():
                continue
            yield doc
            count += 1
            if max_docs is not None and count >= max_docs:
                return
    if count == 0:
        where = res.files[0] if len(res.files) == 1 and res.kind == "files" else res.spec
        raise DataError(f"data '{where}' holds no documents (empty or only whitespace"
                        f"{'' if field == 'text' else f' in field {field!r}'}); give it some text")


def describe_source(spec: str | os.PathLike, *, world_bytes: int = WORLD_BYTES,
                    cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What ``spec`` resolves to: ``{"spec", "kind", "root", "files": [relative names], "split",
    "world_seed", "num_bytes"}`` (``kind`` is ``files``, ``hf_dataset`` or ``world``)."""
    res = _resolve(spec, world_bytes, cache_dir)
    return {
        "spec": os.fspath(spec),
        "kind": "world" if res.world_seed is not None else res.kind,
        "root": str(res.root),
        "files": [res.rel(f) for f in res.files],
        "paths": [str(f) for f in res.files],
        "split": res.split,
        "world_seed": res.world_seed,
        "num_bytes": sum(f.stat().st_size for f in res.files),
    }


def source_hash(spec: str | os.PathLike, field: str = "text", *, world_bytes: int = WORLD_BYTES,
                cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 hex over ``field`` and each resolved file's relative name and content bytes.

    Moving the data to another folder keeps the hash; renaming, adding, removing or editing a file
    changes it.  Reads files in 1 MiB blocks (about 1 s per GB).
    """
    res = _resolve(spec, world_bytes, cache_dir)
    h = hashlib.sha256()
    h.update(b"lmforge-source-v1\0")
    h.update(f"field={field}\0kind={res.kind}\0split={res.split}\0".encode())
    for f in res.files:
        name = res.rel(f).encode("utf-8")
        h.update(len(name).to_bytes(8, "little") + name)
        h.update(f.stat().st_size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            while True:
                block = fh.read(1 << 20)
                if not block:
                    break
                h.update(block)
    return h.hexdigest()
