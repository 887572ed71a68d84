"""Data sources: every format, folders, globs, datasets on disk, the world spec, and the error messages."""

from __future__ import annotations

import csv
import gzip
import json
import types
from pathlib import Path

import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.sources import describe_source, iter_documents, source_hash

DOCS = ["first document\nwith two lines", "second: ünïcödé 🙂", "third, with \"quotes\", commas"]


def _jsonl(path: Path, docs=DOCS, field="text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_txt_blank_line_separated(tmp_path: Path):
    f = tmp_path / "a.txt"
    f.write_text("\ufeffpara one\nline two\n\n\n   \npara two\r\n\r\npara three\n", encoding="utf-8")
    assert list(iter_documents(f)) == ["para one\nline two", "para two", "para three"]
    g = tmp_path / "b.txt"
    g.write_text("no blank lines\nso one document", encoding="utf-8")
    assert list(iter_documents(g)) == ["no blank lines\nso one document"]


def test_txt_split_file_paragraph_line(tmp_path: Path):
    """``file`` is the text exactly as written (BOM dropped, CRLF, blank lines and the last newline kept);
    ``paragraph`` the blocks above; ``line`` every non-blank line; a .gz reads the same; a bad value is refused."""
    text = "para one\nline two\n\n\n   \npara two\r\n\r\npara three\n"
    f = tmp_path / "a.txt"
    f.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert list(iter_documents(f, txt_split="file")) == [text]
    assert list(iter_documents(f, txt_split="paragraph")) == list(iter_documents(f)) == [
        "para one\nline two", "para two", "para three"]
    assert list(iter_documents(f, txt_split="line")) == ["para one", "line two", "para two", "para three"]
    z = tmp_path / "a.txt.gz"
    z.write_bytes(gzip.compress(text.encode()))
    assert list(iter_documents(z, txt_split="file")) == [text]
    with pytest.raises(DataError, match=r"b.txt:2: not valid UTF-8"):  # the line is still named
        (tmp_path / "b.txt").write_bytes(b"fine\nbad \xff\n")
        list(iter_documents(tmp_path / "b.txt", txt_split="file"))
    with pytest.raises(ConfigError, match="txt_split 'para' is not one of file, paragraph, line"):
        iter_documents(f, txt_split="para")


def test_jsonl(tmp_path: Path):
    f = _jsonl(tmp_path / "a.jsonl")
    with open(f, "a") as fh:
        fh.write("\n")  # blank lines are skipped
        fh.write(json.dumps({"text": "   "}) + "\n")  # whitespace docs are skipped
        fh.write(json.dumps({"text": None}) + "\n")  # null is skipped
    assert list(iter_documents(f)) == DOCS
    assert list(iter_documents(f, max_docs=2)) == DOCS[:2]


def test_jsonl_other_field(tmp_path: Path):
    f = _jsonl(tmp_path / "a.jsonl", field="content")
    assert list(iter_documents(str(f), field="content")) == DOCS


def test_jsonl_malformed_line(tmp_path: Path):
    f = _jsonl(tmp_path / "x.jsonl")
    with open(f, "a") as fh:
        fh.write('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError) as e:
        list(iter_documents(f))
    msg = _one_line(e)
    assert f"{f}:5: not valid JSON" in msg and "each line must be one JSON object" in msg


def test_jsonl_missing_field(tmp_path: Path):
    f = _jsonl(tmp_path / "x.jsonl", field="body")
    with pytest.raises(DataError) as e:
        list(iter_documents(f))
    msg = _one_line(e)
    assert f"{f}:1" in msg and "no field 'text'" in msg and "body, id" in msg


def test_jsonl_non_object_and_non_string(tmp_path: Path):
    f = tmp_path / "x.jsonl"
    f.write_text('[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.jsonl:1: expected a JSON object"):
        list(iter_documents(f))
    f.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.jsonl:1: field 'text' is a int, not a string"):
        list(iter_documents(f))


def test_json_array_and_gzip(tmp_path: Path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"text": d} for d in DOCS], indent=2), encoding="utf-8")
    assert list(iter_documents(f)) == DOCS
    g = tmp_path / "b.jsonl.gz"
    with gzip.open(g, "wt", encoding="utf-8") as fh:
        for d in DOCS:
            fh.write(json.dumps({"text": d}) + "\n")
    assert list(iter_documents(g)) == DOCS


def test_invalid_utf8(tmp_path: Path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"fine\n\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"a.txt:3: not valid UTF-8"):
        list(iter_documents(f))


def test_csv_and_tsv(tmp_path: Path):
    f = tmp_path / "a.csv"
    with open(f, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text"])
        for i, d in enumerate(DOCS):
            w.writerow([i, d])
    assert list(iter_documents(f)) == DOCS
    with pytest.raises(DataError) as e:
        list(iter_documents(f, field="body"))
    assert "no column 'body' (columns: id, text)" in _one_line(e)
    t = tmp_path / "a.tsv"
    t.write_text("label\tsentence\n1\thello there\n0\tgoodbye\n", encoding="utf-8")
    assert list(iter_documents(t, field="sentence")) == ["hello there", "goodbye"]


def test_parquet(tmp_path: Path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": DOCS + [None], "n": [1, 2, 3, 4]}), f)
    assert list(iter_documents(f)) == DOCS
    with pytest.raises(DataError) as e:
        list(iter_documents(f, field="body"))
    assert "no column 'body' (columns: text, n)" in _one_line(e)
    with pytest.raises(DataError, match="not strings"):
        list(iter_documents(f, field="n"))


def test_folder_recursive_sorted_and_glob(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    _jsonl(tmp_path / "b.jsonl", ["b0", "b1"])
    (tmp_path / "a.txt").write_text("a0\n\na1\n")
    _jsonl(tmp_path / "sub" / "c.jsonl", ["c0"])
    _jsonl(tmp_path / ".hidden" / "z.jsonl", ["hidden"])
    (tmp_path / "README.md").write_text("# not data\n")
    assert list(iter_documents(tmp_path)) == ["a0", "a1", "b0", "b1", "c0"]
    assert describe_source(tmp_path)["files"] == ["a.txt", "b.jsonl", "sub/c.jsonl"]
    assert list(iter_documents(str(tmp_path / "**" / "*.jsonl"))) == ["b0", "b1", "c0"]
    assert list(iter_documents(str(tmp_path / "*.jsonl"))) == ["b0", "b1"]
    with pytest.raises(DataError, match="matched no files"):
        list(iter_documents(str(tmp_path / "*.parquet")))


def test_missing_empty_unsupported(tmp_path: Path):
    with pytest.raises(DataError) as e:
        iter_documents(tmp_path / "nope.jsonl")  # reported at call time, before iterating
    assert _one_line(e).startswith(f"data path '{tmp_path / 'nope.jsonl'}' does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(DataError) as e:
        list(iter_documents(empty))
    assert "empty.txt" in _one_line(e) and "no documents" in str(e.value)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="e.jsonl' holds no documents"):
        list(iter_documents(tmp_path / "e.jsonl"))
    bad = tmp_path / "x.docx"
    bad.write_text("hi")
    with pytest.raises(DataError) as e:
        list(iter_documents(bad))
    assert "unsupported type '.docx'" in _one_line(e) and ".jsonl" in str(e.value) and ".parquet" in str(e.value)
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(DataError, match="holds no supported files"):
        list(iter_documents(folder))
    with pytest.raises(DataError, match="not a datasets"):
        list(iter_documents(f"{empty}::train"))


def test_datasets_save_to_disk(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": DOCS, "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "single"))
    assert list(iter_documents(tmp_path / "single")) == DOCS
    assert describe_source(tmp_path / "single")["kind"] == "hf_dataset"
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"text": ["v0", "v1"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert list(iter_documents(tmp_path / "dict")) == DOCS
    assert list(iter_documents(f"{tmp_path / 'dict'}::validation")) == ["v0", "v1"]
    with pytest.raises(DataError) as e:
        list(iter_documents(f"{tmp_path / 'dict'}::test"))
    assert "available splits: train, validation" in _one_line(e)
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_documents(tmp_path / "single", field="body"))
    assert source_hash(tmp_path / "dict") != source_hash(f"{tmp_path / 'dict'}::validation")


def test_source_hash(tmp_path: Path):
    d = tmp_path / "data"
    d.mkdir()
    _jsonl(d / "a.jsonl")
    h1 = source_hash(d)
    assert len(h1) == 64 and h1 == source_hash(str(d))
    assert source_hash(d, field="body") != h1
    moved = tmp_path / "moved"
    d.rename(moved)
    assert source_hash(moved) == h1  # names are relative: moving the folder keeps the hash
    (moved / "a.jsonl").rename(moved / "b.jsonl")
    assert source_hash(moved) != h1
    (moved / "b.jsonl").rename(moved / "a.jsonl")
    with open(moved / "a.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "more"}) + "\n")
    assert source_hash(moved) != h1


def test_world_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """'world[:SEED]' resolves through lmforge.data.world.world_corpus_path/write_corpus into the cache."""
    calls = []

    def world_corpus_path(cache_dir, seed, target_bytes):
        return Path(cache_dir) / "world" / f"corpus-s{seed}-b{target_bytes}.jsonl"

    def write_corpus(path, seed=0, target_bytes=0):
        calls.append((seed, target_bytes))
        _jsonl(Path(path), [f"world {seed} doc {i}" for i in range(3)])

    fake = types.ModuleType("lmforge.data.world")
    fake.world_corpus_path, fake.write_corpus = world_corpus_path, write_corpus
    import lmforge.data.sources

    monkeypatch.setattr(lmforge.data.sources, "world", fake)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    assert list(iter_documents("world", world_bytes=1000)) == ["world 0 doc 0", "world 0 doc 1", "world 0 doc 2"]
    assert list(iter_documents("world", world_bytes=1000)) == ["world 0 doc 0", "world 0 doc 1", "world 0 doc 2"]
    assert calls == [(0, 1000)]  # generated once, then read from the cache
    assert next(iter_documents("world:3", world_bytes=1000)) == "world 3 doc 0"
    info = describe_source("world:3", world_bytes=1000)
    assert info["kind"] == "world" and info["world_seed"] == 3
    assert info["paths"][0].startswith(str(tmp_path / "cache"))
    assert source_hash("world:3", world_bytes=1000) != source_hash("world", world_bytes=1000)
    with pytest.raises(DataError, match="world seed must be an integer"):
        list(iter_documents("world:abc"))


def test_real_world_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """With the real built-in world generator (skipped until lmforge.data.world provides its API)."""
    try:
        from lmforge.data import world
    except ImportError:
        pytest.skip("lmforge.data.world is not importable")
    if not (hasattr(world, "world_corpus_path") and hasattr(world, "write_corpus")):
        pytest.skip("lmforge.data.world has no world_corpus_path/write_corpus yet")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    docs = list(iter_documents("world", world_bytes=200_000))
    assert len(docs) > 10 and all(isinstance(d, str) and d.strip() for d in docs)
    assert list(iter_documents("world", world_bytes=200_000)) == docs  # deterministic, cached
    assert source_hash("world", world_bytes=200_000) == source_hash("world", world_bytes=200_000)
