"""Token shards: manifest, exact content, val split, cache reuse, tokenizer checks, atomic building."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.tokenizer import Tokenizer
from lmforge.data.shards import ShardSet, build_shards, token_dtype, val_mask
from lmforge.data.sources import source_hash

DOCS = [f"Doc {i}: the {'cat' if i % 3 else 'dog'} number {i * 7} sat on mat {i % 11}. " * (1 + i % 4)
        for i in range(400)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(DOCS, vocab_size=400)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    f = tmp_path / "data" / "docs.jsonl"
    f.parent.mkdir()
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    return f


def _split_docs(shards: ShardSet, split: str, tok: Tokenizer) -> list[tuple[int, str]]:
    toks = np.asarray(shards.tokens(split))
    off = shards.doc_offsets(split)
    ids = shards.doc_ids(split)
    out = []
    for k in range(len(ids)):
        piece = toks[off[k]:off[k + 1]]
        assert piece[-1] == tok.eos_id  # EOS after every document
        out.append((int(ids[k]), tok.decode(piece[:-1].tolist())))
    return out


def test_manifest_and_content(tok: Tokenizer, data: Path, tmp_path: Path):
    s = build_shards(str(data), tok, cache_dir=tmp_path / "cache", val_fraction=0.1)
    m = s.manifest
    assert not s.reused
    assert m["format"] == "lmforge-shards" and m["version"] == 1 and m["dtype"] == "uint16"
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint
    assert m["source"]["hash"] == source_hash(str(data)) and m["source"]["field"] == "text"
    assert m["source"]["files"] == ["docs.jsonl"] and m["source"]["num_docs"] == len(DOCS)
    assert m["val_fraction"] == 0.1 and "created" in m
    assert s.path.name.startswith(f"{m['source']['hash'][:16]}-{tok.fingerprint[:16]}-")
    assert s.path.parent == tmp_path / "cache"
    for split in ("train", "val"):
        info = m["splits"][split]
        assert s.num_tokens(split) == info["num_tokens"] == sum(x["num_tokens"] for x in info["shards"])
        assert s.tokens(split).dtype == np.uint16 and isinstance(s.tokens(split), np.memmap)
        assert len(s.tokens(split)) == s.num_tokens(split)
        assert (s.path / info["doc_offsets"]).is_file()
        assert s.doc_offsets(split)[-1] == s.num_tokens(split)
        docs = _split_docs(s, split, tok)
        assert all(text == DOCS[i] for i, text in docs)  # tokens decode back to the documents
        assert s.num_bytes(split) == sum(len(DOCS[i].encode()) for i, _ in docs)
        assert s.num_docs(split) == len(docs)
    # every document is in exactly one split, val is roughly 10%
    train_ids, val_ids = set(s.doc_ids("train").tolist()), set(s.doc_ids("val").tolist())
    assert not train_ids & val_ids and train_ids | val_ids == set(range(len(DOCS)))
    assert 15 <= len(val_ids) <= 70
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no tmp dirs left


def test_reuse_without_retokenising(tok: Tokenizer, data: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    s1 = build_shards(data, tok, cache_dir=cache)
    mtime = (s1.path / "manifest.json").stat().st_mtime_ns
    s2 = build_shards(data, tok, cache_dir=cache)
    assert s2.reused and s2.path == s1.path
    assert (s2.path / "manifest.json").stat().st_mtime_ns == mtime
    assert np.array_equal(s1.tokens("train"), s2.tokens("train"))
    # different settings or data -> a different directory
    s3 = build_shards(data, tok, cache_dir=cache, val_fraction=0.2)
    assert s3.path != s1.path and not s3.reused
    with open(data, "a") as fh:
        fh.write(json.dumps({"text": "one more document"}) + "\n")
    s4 = build_shards(data, tok, cache_dir=cache)
    assert s4.path != s1.path and not s4.reused
    assert s4.num_docs("train") + s4.num_docs("val") == len(DOCS) + 1
    s5 = build_shards(data, tok, cache_dir=cache, rebuild=True)
    assert s5.path == s4.path and not s5.reused


def test_txt_split_cuts_documents_and_keys_the_cache(tok: Tokenizer, tmp_path: Path):
    f = tmp_path / "prose.txt"
    f.write_text("one\ntwo\n\nthree\n\nfour\nfive\n", encoding="utf-8")
    built = {split: build_shards(str(f), tok, cache_dir=tmp_path / "cache", val_fraction=0.0, txt_split=split)
             for split in ("paragraph", "line", "file")}
    assert [s.manifest["source"]["num_docs"] for s in built.values()] == [3, 5, 1]
    assert len({s.path for s in built.values()}) == 3 and not any(s.reused for s in built.values())
    assert [d for _, d in _split_docs(built["file"], "train", tok)] == ["one\ntwo\n\nthree\n\nfour\nfive\n"]
    assert build_shards(str(f), tok, cache_dir=tmp_path / "cache", val_fraction=0.0).path == built["paragraph"].path


def test_tokenizer_fingerprint_check(tok: Tokenizer, data: Path, tmp_path: Path):
    s = build_shards(data, tok, cache_dir=tmp_path / "cache")
    other = Tokenizer.train(DOCS[:50], vocab_size=300)
    assert ShardSet.load(s.path, tok).num_tokens("train") == s.num_tokens("train")
    with pytest.raises(DataError) as e:
        ShardSet.load(s.path, other)
    msg = str(e.value)
    assert "\n" not in msg and tok.fingerprint[:12] in msg and other.fingerprint[:12] in msg
    assert build_shards(data, other, cache_dir=tmp_path / "cache").path != s.path


def test_val_split_deterministic_and_seeded(tok: Tokenizer, data: Path, tmp_path: Path):
    a = build_shards(data, tok, cache_dir=tmp_path / "a", val_fraction=0.1, seed=0)
    b = build_shards(data, tok, cache_dir=tmp_path / "b", val_fraction=0.1, seed=0)
    c = build_shards(data, tok, cache_dir=tmp_path / "a", val_fraction=0.1, seed=1)
    assert np.array_equal(a.doc_ids("val"), b.doc_ids("val"))
    assert not np.array_equal(a.doc_ids("val"), c.doc_ids("val"))
    idx = np.arange(100_000)
    assert abs(val_mask(idx, 0, 0.01).mean() - 0.01) < 0.002
    assert np.array_equal(val_mask(idx[500:600], 0, 0.3), val_mask(idx, 0, 0.3)[500:600])  # chunk-independent


def test_workers_and_shard_files_give_same_stream(tok: Tokenizer, data: Path, tmp_path: Path):
    ref = build_shards(data, tok, cache_dir=tmp_path / "ref", val_fraction=0.05)
    multi = build_shards(data, tok, cache_dir=tmp_path / "multi", val_fraction=0.05, num_workers=2,
                         shard_tokens=2000)
    assert len(multi.shards("train")) > 3
    for split in ("train", "val"):
        assert np.array_equal(ref.tokens(split), multi.tokens(split))
        assert np.array_equal(ref.doc_offsets(split), multi.doc_offsets(split))
        for shard in multi.shards(split):  # documents never cross shard files
            assert shard[-1] == tok.eos_id
    assert all(x["num_tokens"] <= 2000 for x in multi.manifest["splits"]["train"]["shards"])


def test_small_corpus_still_gets_a_val_doc(tok: Tokenizer, tmp_path: Path):
    f = tmp_path / "few.txt"
    f.write_text("alpha one\n\nbeta two\n\ngamma three\n")
    s = build_shards(f, tok, cache_dir=tmp_path / "c", val_fraction=0.001)
    assert s.num_docs("val") >= 1 and s.num_docs("train") >= 1
    assert s.num_docs("train") + s.num_docs("val") == 3
    texts = [t for _, t in _split_docs(s, "train", tok)] + [t for _, t in _split_docs(s, "val", tok)]
    assert sorted(texts) == ["alpha one", "beta two", "gamma three"]
    assert s.num_bytes("train") + s.num_bytes("val") == len("alpha onebeta twogamma three")
    z = build_shards(f, tok, cache_dir=tmp_path / "c", val_fraction=0.0)
    assert z.num_tokens("val") == 0 and len(z.tokens("val")) == 0 and z.num_docs("train") == 3


def test_bos_prepended_when_tokenizer_adds_it(tmp_path: Path, data: Path):
    from tokenizers import Tokenizer as HF
    from tokenizers import processors

    base = Tokenizer.train(DOCS, vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"])
    hf = HF.from_str(base.hf.to_str())
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = Tokenizer(hf)
    assert tok.adds_bos
    s = build_shards(data, tok, cache_dir=tmp_path / "c", val_fraction=0.0)
    toks, off = s.tokens("train"), s.doc_offsets("train")
    assert (toks[off[:-1]] == 0).all() and (toks[off[1:] - 1] == 1).all()
    assert tok.decode(toks[off[0] + 1:off[1] - 1]) == DOCS[0]


def test_errors_and_atomicity(tok: Tokenizer, tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{oops\n")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        build_shards(bad, tok, cache_dir=cache)
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-built is left behind
    with pytest.raises(ConfigError, match="val_fraction"):
        build_shards(bad, tok, cache_dir=cache, val_fraction=1.0)
    with pytest.raises(DataError, match="does not exist"):
        ShardSet.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no manifest.json"):
        ShardSet.load(tmp_path / "empty")


def test_split_name_error_and_dtype(tok: Tokenizer, data: Path, tmp_path: Path):
    s = build_shards(data, tok, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="no split 'test'; splits: train, val"):
        s.tokens("test")
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_default_cache_dir_from_env(tok: Tokenizer, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "envcache"))
    s = build_shards(data, tok)
    assert s.path.parent == tmp_path / "envcache" / "shards"
    assert os.path.isfile(s.path / "manifest.json")
