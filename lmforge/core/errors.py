"""One error family for everything a user can get wrong.

The CLI catches :class:`LmforgeError`, prints its message as a single line and exits non-zero; an OS-level
failure the user causes (a full disk, an unwritable path: :func:`user_error`) is worded the same way; any
other exception is a bug in lmforge and keeps its traceback.  Messages name the culprit (file, line,
key or value) and the fix.
"""

from __future__ import annotations

import errno
import os
import re


class LmforgeError(Exception):
    """A user-facing error: the message is one line that says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(LmforgeError):
    """Unknown/invalid config key or value."""


class DataError(LmforgeError):
    """Missing, empty or malformed data."""


class ModelError(LmforgeError):
    """A model directory or checkpoint that cannot be used (not a model, unsupported field, mismatch)."""


class RunError(LmforgeError):
    """Run-directory problems: unwritable, already exists, resume mismatch, NaN loss."""


# What the operating system says when a path cannot be written or read, and what the user does about it.  Only
# these errnos are the user's (their disk, their permissions, their paths); any other OSError is a bug and keeps
# its traceback.
_OS_FIXES = {
    errno.ENOSPC: "free space on that disk (or write somewhere else) and run the command again",
    errno.EDQUOT: "free space within your quota (or write somewhere else) and run the command again",
    errno.EROFS: "that file system is read-only; choose a path you can write to",
    errno.EACCES: "choose a path you can write to, or fix its permissions",
    errno.EPERM: "choose a path you can write to, or fix its permissions",
    errno.ENOTDIR: "a part of that path is a file, not a directory; choose another path",
    errno.EISDIR: "that path is a directory; pass a file path",
    errno.EEXIST: "a file is in the way; choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ENOENT: "check the path",
}
# What torch's zip writer (torch.save) raises when the disk fills mid-file: no errno, only these words.
_SERIALIZER_DISK_FULL = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
# lmforge writes every file and directory under a temporary name first (core/io.py: ".NAME.XXXX.tmp"); a message
# names the file the user asked for.
_TMP_NAME = re.compile(r"(^|/)\.([^/]+)\.[^/.]+\.tmp(?=/|$)")
RESUME_HINT = "a training run continues from its last checkpoint with resume=true"


def is_disk_full(exc: BaseException) -> bool:
    """Is ``exc`` a full disk or quota, as an errno or in a serializer's own words (torch.save's zip writer,
    safetensors' Rust writer: "No space left on device (os error 28)")?"""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return any(s in text for s in (*_SERIALIZER_DISK_FULL, "No space left on device", "os error 28"))


def _untmp(match: re.Match) -> str:
    return match.group(1) + match.group(2)


def user_error(exc: BaseException, training: bool = False) -> LmforgeError | None:
    """The one-line :class:`RunError` for an OS-level failure a user causes (a full disk, a read-only or
    unwritable path, a file where a directory should be), naming the path; None for anything else (a bug).
    The CLI applies it to whatever escapes a command, so every command gets the same wording; ``training``: the
    command trains, so a full disk's line says how the run goes on."""
    hint = f"; {RESUME_HINT}" if training else ""
    if isinstance(exc, OSError) and exc.errno in _OS_FIXES:
        path = exc.filename2 if exc.filename2 is not None else exc.filename  # a rename: its destination
        where = f" '{_TMP_NAME.sub(_untmp, str(path))}'" if path is not None else " (path unknown)"
        disk = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return RunError(f"{exc.strerror or os.strerror(exc.errno)}:{where}; {_OS_FIXES[exc.errno]}"
                        f"{hint if disk else ''}")
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _SERIALIZER_DISK_FULL):
        return RunError(f"writing a file failed mid-way (torch.save: {str(exc).strip().splitlines()[-1][:120]}), "
                        f"which is what a full disk looks like; free space and run the command again{hint}")
    return None
