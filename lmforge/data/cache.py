"""lmforge's cache directory (``$LMFORGE_CACHE``, default ``~/.cache/lmforge``): what is in it, and clearing it.

lmforge writes two kinds of entries there, shared by every run on the machine:

* ``world/world-v*-*-seed*-*.jsonl`` -- built-in world corpora (:func:`lmforge.data.sources.world_path`);
* ``shards/<source>-<tokenizer>-<settings>/`` -- token shards (:func:`lmforge.data.shards.build_shards`), each with
  its ``manifest.json``; and ``shards/.<name>.<pid>.<n>.tmp/``, a build cut off before it finished (listed once
  its process is gone: a live one is still building it).

:func:`cache_entries` finds exactly those, by their names (and a shard dir by its manifest), so
:func:`clear_cache` removes lmforge's entries and nothing else a user keeps in the directory.  Everything is
rebuilt on the next use.  (A run's ``data.cache_dir`` puts its shards elsewhere; those are not listed here.)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lmforge.core.errors import ConfigError
from lmforge.data.shards import BUILDING_NAME, FORMAT, SHARD_DIR_NAME
from lmforge.data.sources import cache_root
from lmforge.data.world import WORLD_CORPUS_NAME

SUBDIRS = ("world", "shards")
"""The folders of the cache lmforge writes into."""


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: str
    """``world corpus``, ``token shards`` or ``unfinished shards``."""
    bytes: int
    about: str
    """What it holds, in a few words (the corpus's seed and size; the shards' source and tokens)."""


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file below a directory (links not followed)."""
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _world_entry(path: Path) -> CacheEntry | None:
    m = WORLD_CORPUS_NAME.fullmatch(path.name)
    if m is None or not path.is_file():
        return None
    return CacheEntry(path, "world corpus", size_of(path), f"seed {m['seed']}, {int(m['bytes']):,} bytes asked")


def _shard_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _shards_entry(path: Path) -> CacheEntry | None:
    if not path.is_dir() or path.is_symlink():
        return None
    building = BUILDING_NAME.fullmatch(path.name)
    if building is not None:
        if _alive(int(building["pid"])):  # being built right now: not ours to take away
            return None
        return CacheEntry(path, "unfinished shards", size_of(path), f"a build cut off (process {building['pid']})")
    manifest = _shard_manifest(path) if SHARD_DIR_NAME.fullmatch(path.name) else None
    if manifest is None:
        return None
    source = manifest.get("source") or {}
    tokens = sum(int((manifest.get("splits") or {}).get(s, {}).get("num_tokens", 0)) for s in ("train", "val"))
    return CacheEntry(path, "token shards", size_of(path), f"{source.get('spec', '?')!s}, {tokens:,} tokens")


def _listing(d: Path) -> list[Path]:
    return sorted(d.iterdir()) if d.is_dir() and not d.is_symlink() else []


def cache_entries(root: str | os.PathLike | None = None) -> list[CacheEntry]:
    """lmforge's entries in the cache ``root`` (default :func:`~lmforge.data.sources.cache_root`), in path order."""
    root = Path(root) if root is not None else cache_root()
    found = [_world_entry(p) for p in _listing(root / "world")] + [_shards_entry(p) for p in _listing(root / "shards")]
    return [e for e in found if e is not None]


def other_entries(root: str | os.PathLike | None = None) -> list[Path]:
    """What else is in the cache directory (and in its world/ and shards/): kept by :func:`clear_cache`."""
    root = Path(root) if root is not None else cache_root()
    ours = {e.path for e in cache_entries(root)}
    others = [p for p in _listing(root) if p.name not in SUBDIRS or not p.is_dir() or p.is_symlink()]
    for sub in SUBDIRS:
        others += [p for p in _listing(root / sub) if p not in ours]
    return sorted(others)


def clear_cache(root: str | os.PathLike | None = None, *, yes: bool = False) -> list[CacheEntry]:
    """Remove lmforge's entries from the cache ``root`` and return them; anything else there stays, and so do
    world/ and shards/ when something else is in them.  Without ``yes`` it removes nothing and says what it would."""
    root = Path(root) if root is not None else cache_root()
    entries = cache_entries(root)
    if entries and not yes:
        total = human_bytes(sum(e.bytes for e in entries))
        raise ConfigError(f"cache clear would remove {len(entries)} lmforge entries ({total}) under '{root}'; pass "
                          f"--yes to remove them (`lmforge cache list` shows them)")
    for e in entries:
        if e.path.is_dir():
            shutil.rmtree(e.path)
        else:
            e.path.unlink()
    for sub in SUBDIRS:  # an emptied folder of ours goes too; one holding anything else stays
        d = root / sub
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()
    return entries


def human_bytes(n: int) -> str:
    """``n`` bytes as ``812 B``, ``31.4 MB``, ... (decimal units, as ``du --si`` and file managers show)."""
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
