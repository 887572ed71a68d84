"""Atomic, durable file writes: nothing already saved is lost if a run dies mid-write or the power fails.  And
:func:`read_json`, whose failure is one line naming the file.

Every file lmforge writes goes to a temporary name in the same directory and is renamed into place
(``os.replace`` is atomic on POSIX), so a reader sees either the old file or the new one.  Before the rename
the new file (or every file and directory of the new tree) is fsynced, and the parent directory after it:
without the first a power cut can publish a name whose data never reached the disk (a truncated checkpoint
that looks complete); without the second the rename itself can be lost.

A full disk met while writing one file (:func:`writing`) is re-raised as ``OSError(ENOSPC)`` naming the file it
was publishing, however the serializer worded it, so that :func:`lmforge.core.errors.user_error` words it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from lmforge.core.errors import is_disk_full


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Around the write of one file (``path``: the name it is published as): a full disk, however the writer
    reports it (torch.save's zip writer and safetensors raise without an errno or a file name), becomes
    ``OSError(ENOSPC)`` naming ``path`` (an OSError that names its own file is left as it is)."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e) or getattr(e, "filename", None) is not None:  # not full, or it names its file
            raise
        code = e.errno if isinstance(e, OSError) else errno.ENOSPC
        raise OSError(code, os.strerror(code), str(path)) from None


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (renames, new files) durable; a filesystem that cannot fsync a directory
    (some network and Windows filesystems) is left to its own guarantees."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root``, then every directory, deepest first (``root`` last)."""
    dirs = []
    for d, _, files in os.walk(root):
        dirs.append(d)
        for f in files:
            fsync_file(os.path.join(d, f))
    for d in reversed(dirs):
        fsync_dir(d)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with writing(path):
            yield tmp_path
            fsync_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
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
    """Rename the finished directory ``tmp`` onto ``path`` (its contents fsynced first, the parent after); an
    existing ``path`` is moved aside first, put back if the rename fails, and deleted only after the new one is
    in place."""
    tmp, path = Path(tmp), Path(path)
    with writing(path):
        fsync_tree(tmp)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
