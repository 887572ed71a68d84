"""Every Python file in the project parses, so a syntax error in a slow tier (acceptance, benchmarks) is caught by
the fast README tier instead of after an hour of CI."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted(p for d in ("lmforge", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_parses(path):
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
