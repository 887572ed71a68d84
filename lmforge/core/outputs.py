"""Guarded outputs: a command writes into a directory only when the directory is its own, and never deletes a file
that lmforge did not write.

Every directory lmforge writes as a whole (a model dir, a tokenizer dir, a bench's run) carries a small marker,
``lmforge.json``: what wrote it (command, lmforge version, time), what kind of directory it is and the files it
wrote (``files``), plus whatever the writer records beside (a model dir: its tokenizer's fingerprint).  With it:

- :func:`check_output_dir` refuses a non-empty target that this job does not own, unless the user forces it
  (``--force`` / ``overwrite=true``); the refusal is one line naming the directory, a few of its entries and the fix;
- :func:`publish_dir` puts a finished temporary directory in place: whole (the old directory moved aside and
  deleted after) only when every file in the old one is listed in its marker, else file by file, so a forced
  write into a directory holding someone's files replaces the files of the names it writes and keeps the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from lmforge import __version__
from lmforge.core.errors import ConfigError
from lmforge.core.io import atomic_write_json, fsync_dir, fsync_tree, replace_dir

MARKER = "lmforge.json"

_command = "python"  # what wrote the outputs of this process: the CLI sets its command, the library says python


@contextmanager
def running(command: str) -> Iterator[None]:
    """Inside the block, markers record ``command`` as their writer (the CLI wraps each command in it)."""
    global _command
    before, _command = _command, command
    try:
        yield
    finally:
        _command = before


def make_marker(kind: str, files: list[str], **extra: Any) -> dict[str, Any]:
    """The marker of a directory of ``kind`` whose files (names relative to it) are ``files``."""
    return {"written_by": "lmforge", "version": __version__, "command": _command,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kind": kind,
            "files": sorted(set(files) | {MARKER}), **extra}


def write_marker(d: str | os.PathLike, kind: str, files: list[str], **extra: Any) -> dict[str, Any]:
    marker = make_marker(kind, files, **extra)
    atomic_write_json(Path(d) / MARKER, marker)
    return marker


def read_marker(d: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of ``d``; None when there is none or it is not lmforge's (a file of that name a user made, or a
    torn one: either way nothing in ``d`` counts as lmforge's)."""
    try:
        marker = json.loads((Path(d) / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != "lmforge" or not isinstance(
            marker.get("files"), list):
        return None
    return marker


def entries(d: str | os.PathLike) -> list[str]:
    """The names in directory ``d`` (sorted; none when it does not exist)."""
    d = Path(d)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def foreign_entries(d: str | os.PathLike) -> list[str]:
    """The entries of ``d`` its marker does not list: what lmforge did not write there (all of them without a
    marker).  Temporary names of an interrupted atomic write (``.name.*.tmp``) are lmforge's too."""
    marker = read_marker(d)
    listed = set(marker["files"]) if marker else set()
    return [n for n in entries(d) if n not in listed and not (n.startswith(".") and n.endswith((".tmp", ".old")))]


def describe(names: list[str], d: Path, limit: int = 4) -> str:
    shown = [n + ("/" if (d / n).is_dir() else "") for n in names[:limit]]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(path: str | os.PathLike, *, force: bool, what: str, flag: str = "--force",
                     owned: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Refuse to write directory ``path`` (``what`` names it in the message, e.g. ``--out 'x'``) when it exists and
    is not empty, unless this job owns it (``owned(marker)`` says so of its lmforge marker) or ``force``.  A file
    at ``path`` is refused always.  Forcing never deletes a file: :func:`publish_dir` keeps what it did not write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} is a file, not a directory; choose a directory")
    present = entries(path)
    if not present or force:
        return
    marker = read_marker(path)
    if marker is not None and owned is not None and owned(marker):
        return
    who = (f"lmforge's '{marker.get('command')}' of {marker.get('time')}" if marker else "not lmforge")
    raise ConfigError(f"{what} already holds files ({describe(present, path)}; written by {who}); choose a new or "
                      f"empty directory, or pass {flag} to write beside them (files of other names are kept)")


def check_output_file(path: str | os.PathLike, *, force: bool, what: str, flag: str = "--force") -> None:
    """Refuse to write file ``path`` over an existing file unless ``force``, and over a directory always."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} is a directory; name a file")
    if path.exists() and not force:
        raise ConfigError(f"{what} already exists; name a new file, or pass {flag} to replace it")


def publish_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished directory ``tmp`` to ``path``.  A missing or empty ``path``, or one whose every file its
    marker lists (lmforge wrote them all), is replaced whole and atomically; otherwise (a forced write into a
    directory with files of someone else's) each file of ``tmp`` replaces its namesake and the rest is kept."""
    tmp, path = Path(tmp), Path(path)
    if not path.exists() or not foreign_entries(path):
        replace_dir(tmp, path)
        return
    fsync_tree(tmp)  # durable before any of it is published (core/io.py: why)
    for src in sorted(tmp.iterdir(), key=lambda p: p.name == MARKER):  # the marker last: it lists what is there
        dst = path / src.name
        if dst.is_dir() and not src.is_dir():
            raise ConfigError(f"'{dst}' is a directory where lmforge writes a file; move it away and re-run")
        if src.is_dir():
            publish_dir(src, dst)
        else:
            os.replace(src, dst)
    fsync_dir(path)
    shutil.rmtree(tmp, ignore_errors=True)
