"""Atomic file writes: nothing already saved is lost if a run dies mid-write.  And :func:`read_json`, whose
failure is one line naming the file.

Every file lmforge writes goes to a temporary name in the same directory and is renamed into place
(``os.replace`` is atomic on POSIX), so a reader sees either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError, fix: str = "") -> Any:
    """The JSON value in ``path``; an unreadable or malformed file raises ``error`` with one line naming the file,
    the reason and (``fix``) what to do."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"'{path}' is not a readable JSON file ({e}){'; ' + fix if fix else ''}") from None


@contextmanager
def atomic_dir(path: str | os.PathLike, publish: Callable[[Path, Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` whole.

    An existing ``path`` is moved aside first and deleted only after the new directory is in place.  ``publish``
    (``publish(tmp, path)``) puts it in place instead, e.g. :func:`lmforge.core.outputs.publish_dir`, which keeps
    the files of a directory lmforge did not write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        (publish or replace_dir)(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished directory ``tmp`` onto ``path``; an existing ``path`` is moved aside first and
    deleted only after the new one is in place."""
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
