"""File formats: one record reader, and the document readers built on it.

:func:`read_records` reads JSON lines or a JSON array (``.jsonl``/``.json``), CSV/TSV with a header row and Parquet
(``.gz`` of the text formats too) as ``(where, record)`` pairs.  The document readers here (behind
:func:`lmforge.data.sources.iter_documents`: a text field of each record, or ``.txt`` text) and the task loader
(:func:`lmforge.data.tasks.iter_records`) both read files through it.  A ``.txt`` file is one document, its
paragraphs or its lines (:data:`TXT_SPLITS`): evaluation reads it whole, training by paragraphs unless told.  Its
syntax errors (UTF-8, JSON, CSV) are ``DataError``s naming the file and line in the caller's words
(:class:`Wording`), so each caller keeps its messages.  Resolving a spec to files is :mod:`lmforge.data.sources`'s job.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import sys
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

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


def _whole_gzip(path: Path, items: Iterator[Any]) -> Iterator[Any]:
    """``items`` read from ``path``; a torn or foreign ``.gz`` (gzip fails only once reading reaches the damage) is
    one line naming the file."""
    try:
        yield from items
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"'{path}' is not a complete gzip file ({e}); re-compress it or pass the file "
                        f"uncompressed") from None


class Wording:
    """The messages of the syntax errors the readers raise.  These are the document readers'; the task loader
    words some differently (a subclass in :mod:`lmforge.data.tasks`)."""

    def bad_utf8(self, path: Path, line: int | None, byte: int, offset: int) -> str:
        """``line``: the line being decoded, None for a whole file (a JSON array); ``byte``: the bad byte's
        position in that line (or in the text after a byte-order mark), ``offset``: in the file."""
        return f"{path}{'' if line is None else f':{line}'}: not valid UTF-8 (byte {byte}); save the file as UTF-8"

    def bad_json_array(self, path: Path, e: json.JSONDecodeError) -> str:
        return (f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); a .json file must be a JSON "
                f"array of objects or one JSON object per line")

    def bad_csv(self, path: Path, line_num: int, e: UnicodeDecodeError | csv.Error) -> str:
        """``line_num``: the lines the CSV reader had read when ``e`` came."""
        if isinstance(e, UnicodeDecodeError):
            return f"{path}:{line_num + 1}: not valid UTF-8 (byte {e.start}); save the file as UTF-8"
        return f"{path}:{line_num}: not valid CSV ({e}); fix the quoting on that line"

    def no_column(self, where: str, column: str, columns: Sequence[str]) -> str:
        return (f"{where}: no column '{column}' (columns: {', '.join(columns[:30]) or 'none'}); choose the text "
                f"column with --field / data.field")


_DOCUMENTS = Wording()


def decode_line(raw: bytes, path: Path, lineno: int, offset: int = 0, wording: Wording = _DOCUMENTS) -> str:
    """Line ``lineno`` (starting at byte ``offset`` of the file) as text, without a leading byte-order mark."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(wording.bad_utf8(path, lineno, e.start, offset + e.start)) from None
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]
    return text


# ---- records ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Where:
    """A record's place in its file: ``line`` (JSON lines; CSV: the line its row ends on), ``item`` (a JSON
    array's index) or ``row`` (Parquet).  ``str()`` gives ``file:line``, ``file:item N`` or ``file:row N``."""

    path: Path
    line: int | None = None
    item: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.item is not None:
            return f"{self.path}:item {self.item}"
        if self.row is not None:
            return f"{self.path}:row {self.row}"
        return f"{self.path}:{self.line}"


def record_format(path: Path) -> str | None:
    """``"json"``, ``"csv"`` (CSV or TSV) or ``"parquet"`` by ``path``'s extension, else None."""
    ext = file_ext(path)
    if ext.startswith(".json"):
        return "json"
    if ext.startswith(".csv") or ext.startswith(".tsv"):
        return "csv"
    return "parquet" if ext == ".parquet" else None


def read_records(path: Path, columns: Sequence[str] = (), wording: Wording = _DOCUMENTS
                 ) -> Iterator[tuple[Where, Any]]:
    """``(where, record)`` for each record of a JSON-lines / JSON-array / CSV / TSV / Parquet file (see
    :func:`record_format`), in file order.  JSON records are any JSON value (the caller checks for objects), CSV
    rows dicts of strings (None for missing cells), Parquet rows dicts.  ``columns``: the columns the caller needs
    of a CSV or Parquet file (a missing one is an error; Parquet reads only those)."""
    fmt = record_format(path)
    if fmt == "json":
        return _whole_gzip(path, _json_records(path, wording))
    if fmt == "csv":
        return _whole_gzip(path, _csv_records(path, columns, wording))
    if fmt == "parquet":
        return _parquet_records(path, columns, wording)
    raise ValueError(f"'{path}' is not a JSON, CSV, TSV or Parquet file")


def _json_records(path: Path, wording: Wording) -> Iterator[tuple[Where, Any]]:
    """One JSON value per non-blank line; a ``.json`` file whose first non-blank line starts with ``[`` is one
    JSON array, read whole."""
    maybe_array = not file_ext(path).startswith(".jsonl")
    offset = 0
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_line(raw, path, lineno, offset, wording)
            offset += len(raw)
            if not line.strip():
                continue
            if maybe_array:
                maybe_array = False
                if line.lstrip().startswith("["):
                    break
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each line must "
                                f"be one JSON object") from None
            yield Where(path, line=lineno), obj
        else:
            return
    yield from _json_array(path, wording)


def _json_array(path: Path, wording: Wording) -> Iterator[tuple[Where, Any]]:
    with open_binary(path) as f:
        raw = f.read()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        data = json.loads(raw[bom:].decode("utf-8"))  # a list: the text's first non-blank character is '['
    except UnicodeDecodeError as e:
        raise DataError(wording.bad_utf8(path, None, e.start, bom + e.start)) from None
    except json.JSONDecodeError as e:
        raise DataError(wording.bad_json_array(path, e)) from None
    for i, obj in enumerate(data):
        yield Where(path, item=i), obj


def _csv_records(path: Path, columns: Sequence[str], wording: Wording) -> Iterator[tuple[Where, dict[str, Any]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    delimiter = "\t" if file_ext(path).startswith(".tsv") else ","
    with open_binary(path) as fb:
        reader = csv.reader(io.TextIOWrapper(fb, encoding="utf-8-sig", newline=""), delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:  # an empty file
                return
            for column in columns:
                if column not in header:
                    raise DataError(wording.no_column(f"{path}:1", column, header))
            for row in reader:
                if not row:  # a blank line
                    continue
                record: dict[str, Any] = {}
                for i, name in enumerate(header):  # the first of two same-named columns wins; cells past the
                    record.setdefault(name, row[i] if i < len(row) else None)  # header are dropped
                yield Where(path, line=reader.line_num), record
        except (UnicodeDecodeError, csv.Error) as e:
            raise DataError(wording.bad_csv(path, reader.line_num, e)) from None


def _parquet_records(path: Path, columns: Sequence[str], wording: Wording) -> Iterator[tuple[Where, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq  # optional: pip install -e ".[data]"
    except ImportError:
        raise DataError(f"reading '{path}' needs pyarrow; install it with 'pip install pyarrow'") from None
    unreadable = "'{}' is not a readable Parquet file ({})"
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) and OSError variants
        raise DataError(unreadable.format(path, str(e).splitlines()[0])) from None
    names = pf.schema_arrow.names
    for column in columns:
        if column not in names:
            raise DataError(wording.no_column(str(path), column, names))
    batches, row = pf.iter_batches(batch_size=2048, columns=list(columns) or None), 0
    while True:
        try:  # pages are read, and found corrupt, batch by batch
            batch = next(batches, None)
        except Exception as e:
            raise DataError(unreadable.format(path, str(e).splitlines()[0])) from None
        if batch is None:
            return
        for record in batch.to_pylist():
            yield Where(path, row=row), record
            row += 1


# ---- documents --------------------------------------------------------------------------------------------

def _decoded_lines(path: Path) -> Iterator[str]:
    """The lines of a text file as written (line endings kept), UTF-8 errors naming the line."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            yield decode_line(raw, path, lineno)


def _whole_file(lines: Iterator[str]) -> Iterator[str]:
    """The file is one document, exactly as written: every newline and blank line kept (what evaluation reads,
    so a score is the score of the text in the file)."""
    yield "".join(lines)


def _paragraphs(lines: Iterator[str]) -> Iterator[str]:
    """Blocks of non-blank lines separated by blank (empty or whitespace-only) lines; a block's lines joined with
    ``\\n``."""
    block: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _lines(lines: Iterator[str]) -> Iterator[str]:
    """Every non-blank line (without its line ending) is a document."""
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


TXT_SPLITS = {"file": _whole_file, "paragraph": _paragraphs, "line": _lines}
"""How a ``.txt`` file becomes documents (``data.txt_split`` / ``--txt-split``)."""
DEFAULT_TXT_SPLIT = "paragraph"
"""Training's default: today's reading, so a corpus of paragraphs trains as it always did."""


def _read_txt(path: Path, field: str, split: str = DEFAULT_TXT_SPLIT) -> Iterator[str]:
    return TXT_SPLITS[split](_decoded_lines(path))


def _read_json(path: Path, field: str) -> Iterator[str]:
    for where, obj in read_records(path):
        doc = _doc_of_line(obj, where, field) if where.item is None else _doc_of_item(obj, where, field)
        if doc is not None:
            yield doc


def _doc_of_line(obj: Any, where: Where, field: str) -> str | None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with a '{field}' field, got "
                        f"{type(obj).__name__}; each line must be one JSON object")
    if field not in obj:
        keys = ", ".join(map(str, list(obj)[:20])) or "none"
        raise DataError(f"{where}: no field '{field}' (keys present: {keys}); choose the text field "
                        f"with --field / data.field")
    value = obj[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' is a {type(value).__name__}, not a string; "
                        f"choose a text field with --field / data.field")
    return value


def _doc_of_item(obj: Any, where: Where, field: str) -> str | None:
    path, i = where.path, where.item
    if not isinstance(obj, dict):
        raise DataError(f"{path}: item {i} is a {type(obj).__name__}, not an object with a '{field}' field")
    if field not in obj:
        keys = ", ".join(map(str, list(obj)[:20])) or "none"
        raise DataError(f"{path}: item {i} has no field '{field}' (keys present: {keys}); choose the text "
                        f"field with --field / data.field")
    value = obj[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{path}: item {i} field '{field}' is a {type(value).__name__}, not a string; "
                        f"choose a text field with --field / data.field")
    return value


def _read_column(path: Path, field: str) -> Iterator[str]:
    """Column ``field`` of a CSV/TSV or Parquet file."""
    for _, record in read_records(path, columns=[field]):
        value = record.get(field)
        if value is None:
            continue
        if not isinstance(value, str):  # Parquet columns are typed; CSV cells are always text
            raise DataError(f"{path}: column '{field}' holds {type(value).__name__} values, not strings; "
                            f"choose a text column with --field / data.field")
        yield value


READERS = {".txt": _read_txt, ".jsonl": _read_json, ".json": _read_json, ".csv": _read_column,
           ".tsv": _read_column, ".parquet": _read_column}


def reader_for(path: Path, txt_split: str = DEFAULT_TXT_SPLIT):
    """The reader of ``path``'s format: ``reader_for(path)(path, field)`` yields its documents; a ``.txt`` file's
    are cut as ``txt_split`` says (one of :data:`TXT_SPLITS`)."""
    ext = file_ext(path)
    base = ext[:-3] if ext.endswith(".gz") else ext
    read = partial(_read_txt, split=txt_split) if base in TEXT_EXTS else READERS[base]
    if ext.endswith(".gz"):
        return lambda p, field: _whole_gzip(p, read(p, field))
    return read
