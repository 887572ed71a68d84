"""One error family for everything a user can get wrong.

The CLI catches :class:`LmforgeError`, prints its message as a single line and exits non-zero; any
other exception is a bug in lmforge and keeps its traceback.  Messages name the culprit (file, line,
key or value) and the fix.
"""

from __future__ import annotations


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
