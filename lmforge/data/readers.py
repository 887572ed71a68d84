"""File formats as streams of documents: the readers behind :func:`lmforge.data.sources.iter_documents`
(``.txt`` blocks, JSON lines or arrays, CSV/TSV, Parquet; ``.gz`` for the text formats), and the helpers the task
loader shares with them (:func:`file_ext`, :func:`open_binary`, :func:`decode_line`).  Resolving a spec to files is
:mod:`lmforge.data.sources`'s job."""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from pathlib import Path
from typing import IO, Any, Iterator

from lmforge.core.errors import DataError

TEXT_EXTS = (".txt",)
JSON_EXTS = (".jsonl", ".json")
CSV_EXTS = (".csv", ".tsv")
PARQUET_EXTS = (".parquet",)
_BASE_EXTS = TEXT_EXTS + JSON_EXTS + CSV_EXTS + PARQUET_EXTS
SUPPORTED_EXTS = _BASE_EXTS + tuple(e + ".gz" for e in TEXT_EXTS + JSON_EXTS + CSV_EXTS)


def file_ext(path: Path) -> str:
    """The supported extension ``path`` ends in (the longest: ``.jsonl.gz`` over ``.gz``), else its suffix."""
    name = path.name.lower()
    for ext in sorted(SUPPORTED_EXTS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def open_binary(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]
    return text


def _read_txt(path: Path, field: str) -> Iterator[str]:
    block: list[str] = []
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, path, lineno).rstrip("\r\n")
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def _doc_from_record(obj: Any, path: Path, lineno: int, field: str) -> str | None:
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object with a '{field}' field, got "
                        f"{type(obj).__name__}; each line must be one JSON object")
    if field not in obj:
        keys = ", ".join(map(str, list(obj)[:20])) or "none"
        raise DataError(f"{path}:{lineno}: no field '{field}' (keys present: {keys}); choose the text field "
                        f"with --field / data.field")
    value = obj[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: field '{field}' is a {type(value).__name__}, not a string; "
                        f"choose a text field with --field / data.field")
    return value


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    maybe_array = not file_ext(path).startswith(".jsonl")  # a .json file may be a JSON array
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, path, lineno)
            if not line.strip():
                continue
            if maybe_array:
                maybe_array = False
                if line.lstrip().startswith("["):
                    break
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each line "
                                f"must be one JSON object") from None
            doc = _doc_from_record(obj, path, lineno, field)
            if doc is not None:
                yield doc
        else:
            return
    yield from _read_json_array(path, field)


def _read_json_array(path: Path, field: str) -> Iterator[str]:
    with open_binary(path) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); a .json file must "
                        f"be a JSON array of objects or one JSON object per line") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must be a JSON array of objects or one JSON object per line")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: item {i} is a {type(obj).__name__}, not an object with a '{field}' field")
        if field not in obj:
            keys = ", ".join(map(str, list(obj)[:20])) or "none"
            raise DataError(f"{path}: item {i} has no field '{field}' (keys present: {keys}); choose the text "
                            f"field with --field / data.field")
        value = obj[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{path}: item {i} field '{field}' is a {type(value).__name__}, not a string; "
                            f"choose a text field with --field / data.field")
        yield value


def _read_csv(path: Path, field: str) -> Iterator[str]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    delimiter = "\t" if file_ext(path).startswith(".tsv") else ","
    with open_binary(path) as fb:
        text = io.TextIOWrapper(fb, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            if field not in header:
                cols = ", ".join(header[:30]) or "none"
                raise DataError(f"{path}:1: no column '{field}' (columns: {cols}); choose the text column "
                                f"with --field / data.field")
            col = header.index(field)
            for row in reader:
                if not row:
                    continue
                if col < len(row):
                    yield row[col]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{reader.line_num + 1}: not valid UTF-8 (byte {e.start}); save the file "
                            f"as UTF-8") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e}); fix the quoting on that line") from None


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading '{path}' needs pyarrow; install it with 'pip install pyarrow'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) and OSError variants
        raise DataError(f"'{path}' is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no column '{field}' (columns: {', '.join(names[:30])}); choose the text "
                        f"column with --field / data.field")
    for batch in pf.iter_batches(batch_size=2048, columns=[field]):
        column = batch.column(0)
        for value in column.to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{path}: column '{field}' holds {type(value).__name__} values, not strings; "
                                f"choose a text column with --field / data.field")
            yield value


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_jsonl, ".csv": _read_csv,
           ".tsv": _read_csv, ".parquet": _read_parquet}


def reader_for(path: Path):
    """The reader of ``path``'s format: ``reader_for(path)(path, field)`` yields its documents."""
    ext = file_ext(path)
    return READERS[ext[:-3] if ext.endswith(".gz") else ext]
