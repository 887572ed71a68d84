"""`lmforge cache list` / `lmforge cache clear`: lmforge's entries in $LMFORGE_CACHE (world corpora, token shards,
builds cut off), their sizes, and a clear that needs --yes and removes nothing that is not lmforge's."""

from __future__ import annotations

import json
import os

import pytest

from lmforge.core.tokenizer import Tokenizer
from lmforge.data.shards import build_shards
from tests.conftest import cli
from tests.faults import assert_refused, assert_unchanged, hashes


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A cache with one entry of each kind lmforge writes, beside files that are not lmforge's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LMFORGE_CACHE", str(root))
    text = tmp_path / "t.txt"
    text.write_text("a small text to tokenise\n\nand a second paragraph of it\n" * 20)
    shards = build_shards(str(text), Tokenizer.train([text.read_text()], 300), val_fraction=0.0)  # default: CACHE/shards
    world = root / "world" / "world-v1-default-seed3-5000.jsonl"
    world.parent.mkdir(parents=True)
    world.write_text('{"text": "a corpus"}\n' * 100)
    dead = root / "shards" / f".{shards.path.name}.999999999.1.tmp"  # a build whose process is gone
    dead.mkdir()
    (dead / "train-00000.bin").write_bytes(b"\0" * 64)
    theirs = {
        "notes": root / "notes.txt",  # the user's, in the cache dir
        "world-like": root / "world" / "my-world.jsonl",  # not a name lmforge gives
        "no-manifest": root / "shards" / "0123456789abcdef-0123456789abcdef-01234567" / "data.bin",
        "foreign-manifest": root / "shards" / "fedcba9876543210-fedcba9876543210-76543210" / "manifest.json",
        "building": root / "shards" / f".{shards.path.name}.{os.getpid()}.2.tmp" / "x.bin",  # a live build
    }
    for path in theirs.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"format": "theirs"}')
    return root, {"shards": shards.path, "world": world, "dead": dead}, theirs


def test_cache_list_shows_lmforge_entries_sizes_and_total(cache):
    root, ours, theirs = cache
    proc = cli("cache", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cache"] == str(root)
    got = {e["path"]: e for e in out["entries"]}
    assert set(got) == {str(p) for p in ours.values()}
    assert got[str(ours["shards"])]["kind"] == "token shards" and "t.txt" in got[str(ours["shards"])]["about"]
    assert got[str(ours["world"])]["kind"] == "world corpus" and got[str(ours["dead"])]["kind"] == "unfinished shards"
    sizes = {str(p): sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
             for p in ours.values()}
    assert {k: e["bytes"] for k, e in got.items()} == sizes and out["total_bytes"] == sum(sizes.values())
    assert set(out["others"]) >= {str(theirs["notes"]), str(theirs["world-like"])}
    proc = cli("cache", "list")
    assert proc.returncode == 0 and str(root) in proc.stdout and "LMFORGE_CACHE" in proc.stdout
    assert "total " in proc.stdout and "in 3 entries" in proc.stdout and ours["world"].name in proc.stdout


def test_cache_clear_needs_yes_and_removes_only_lmforge_entries(cache):
    root, ours, theirs = cache
    before = hashes(root)
    assert_refused(cli("cache", "clear"), "--yes", "3 lmforge entries", str(root))
    assert_unchanged(before)  # refused: nothing removed
    kept = hashes(*theirs.values())
    proc = cli("cache", "clear", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "removed 3 entries" in proc.stdout
    assert not any(p.exists() for p in ours.values())
    assert_unchanged(kept)  # the user's files, a live build and dirs lmforge did not make are all still there
    assert (root / "world").is_dir()  # it still holds the user's file
    again = json.loads(cli("cache", "list", "--json").stdout.strip().splitlines()[-1])
    assert again["entries"] == [] and again["total_bytes"] == 0
