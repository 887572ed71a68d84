"""The gpt2 pipeline's in-context table (issue 25): zero/few-shot accuracy of the pretrained model on world tasks
beside chance, in report.md and RUN_DIR/incontext.json, and the command the report gives prints a number of it
again.  Reads the session's shared gpt2 pipeline; its own cost is one `lmforge eval choice` call (~10 s)."""

import json
import math
import shlex

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize("family", ["gpt2"])
def test_pipeline_incontext_table_beside_chance(pipeline_run, family):
    run_dir, summary = pipeline_run(family)
    data = json.loads((run_dir / "incontext.json").read_text())
    report = (run_dir / "report.md").read_text()
    assert "## In-context (zero/few-shot)" in report and data["max_length"] == 128
    chances = {"world-arithmetic": 0.25, "world-kind": 0.2, "world-true-false": 0.5, "world-sentiment": 0.5}
    for task, per in data["results"].items():
        assert [int(k) for k in per] == data["shots"]
        row = f"| {task} | acc | {per['0']['chance']:.3f} | {per['0']['majority']:.3f} | " + " | ".join(f"{per[str(k)]['acc']:.3f}"
                                                                         for k in data["shots"]) + " |"
        assert row in report, row
        if task in chances:
            assert math.isclose(per["0"]["chance"], chances[task])
        print(f"{task}: chance {per['0']['chance']:.3f}, " +
              ", ".join(f"k={k} {per[str(k)]['acc']:.3f}" for k in data["shots"]))
    # the report's command, on its first task and k = 0, prints the same accuracy
    argv = shlex.split(data["command"])[1:]
    argv = argv[:argv.index("--tasks") + 1] + [argv[argv.index("--tasks") + 1], "-k", "0", "--limit",
                                                str(data["n"]), "--json"]
    proc = run_cli(*argv, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    task = next(iter(data["results"]))
    assert again[task]["0"]["acc"] == data["results"][task]["0"]["acc"]
