"""The largest |lmforge - transformers| difference each parity test saw, per comparison.

The parity tests (tests/parity/test_hf_*.py) assert their tolerances; this script runs them in this process and
prints how far below those tolerances the measured differences are, which a passing test does not show::

    python benchmarks/parity_max_diff.py            # all four modules
    python benchmarks/parity_max_diff.py -k gpt2    # extra arguments go to pytest

The last line is JSON: {"max_abs_diff": {module: {comparison: diff}}, "worst": ..., "machine": ...}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from common import machine

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["test_hf_decoder", "test_hf_bert", "test_hf_t5", "test_hf_task_heads"]


class Collect:
    """A pytest plugin that keeps each parity module's MAX_ABS_DIFF table when the session ends."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, float]] = {}

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        for name, module in sys.modules.items():
            table = getattr(module, "MAX_ABS_DIFF", None)
            if name.rpartition(".")[2] in MODULES and isinstance(table, dict):
                self.tables[name.rpartition(".")[2]] = dict(sorted(table.items()))


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    collect = Collect()
    paths = [str(ROOT / "tests" / "parity" / f"{m}.py") for m in MODULES]
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:xdist", *paths, *argv], plugins=[collect])
    worst = ("", "", 0.0)
    for module, table in collect.tables.items():
        print(f"\n{module}")
        for key, diff in table.items():
            print(f"  {key:40s} {diff:.3g}")
            if diff >= worst[2]:
                worst = (module, key, diff)
    print(json.dumps({"max_abs_diff": collect.tables, "worst": {"module": worst[0], "comparison": worst[1],
                                                               "diff": worst[2]}, "pytest_rc": int(rc),
                      "machine": machine()}))
    return int(rc)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
