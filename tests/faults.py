"""What every fault test asserts: a refusal is one line without a traceback and a non-zero exit, and every file
that existed before the command is byte-identical afterwards.

    before = hashes(run_dir, model_dir)
    proc = run_cli("merge", "--base", ..., "--out", str(run_dir))
    assert_refused(proc, "already holds")
    assert_unchanged(before)
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def hashes(*roots: str | Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a root may be a file), keyed by path; hidden files included."""
    out: dict[str, str] = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def assert_unchanged(before: dict[str, str]) -> None:
    """Every file in ``before`` still exists with the same bytes (new files are allowed)."""
    lost = [p for p in before if not Path(p).is_file()]
    changed = [p for p in before if Path(p).is_file() and hashlib.sha256(Path(p).read_bytes()).hexdigest() != before[p]]
    assert not lost and not changed, f"lost {lost[:5]}, changed {changed[:5]}"


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit, no traceback, exactly one ``error:`` line on stderr containing every fragment (case-folded);
    returns that line."""
    assert proc.returncode not in (0, None), f"exit {proc.returncode}: {proc.stdout[-500:]} {proc.stderr[-500:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in error_lines(proc) if line.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line, got: {proc.stderr[-2000:]}"
    for frag in fragments:
        assert frag.lower() in errors[0].lower(), f"{frag!r} not in {errors[0]!r}"
    return errors[0]
