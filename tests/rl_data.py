"""Prompt files for the RL tests: short arithmetic prompts with verifier fields (a tiny model's context holds them)."""

from __future__ import annotations

import json
from pathlib import Path


def write_prompts(path: Path, n: int = 24, start: int = 0, fields: bool = True) -> Path:
    rows = [{"prompt": f"What is {i} plus one?", **({"answer": str(i + 1), "check": "number"} if fields else {})}
            for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
