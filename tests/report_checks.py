"""Checks of a pipeline run's report, shared by the tiny smoke run and the real acceptance run: every link
resolves, the curves hold every logged point, and the report's reproduce command prints the report's number."""

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import run_cli


def assert_links_resolve(report: Path) -> set[Path]:
    """Every markdown link of ``report`` and of the reports it links names an existing file; returns the reports."""
    todo, seen = [report.resolve()], set()
    while todo:
        md = todo.pop()
        seen.add(md)
        for link in re.findall(r"\]\(([^)\s]+)\)", md.read_text(encoding="utf-8")):
            target = (md.parent / link).resolve()
            assert target.is_file(), f"{md} links {link}, which does not exist"
            if target.suffix == ".md" and target not in seen:
                todo.append(target)
    return seen


def assert_curves_hold_every_point(run_dir: Path, right: str) -> None:
    """``curves.json`` (what curves.png plots) against ``metrics.jsonl``: every training-loss record — those at
    evaluation steps, which carry val_* too, and the last step included — every validation loss, and ``right``."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plotted = json.loads((run_dir / "curves.json").read_text())
    logged_loss = [[m["step"], m["loss"]] for m in metrics if "loss" in m and "step" in m]
    assert plotted["train loss"] == logged_loss
    steps = [s for s, _ in logged_loss]
    evals = [m for m in metrics if "val_loss" in m]
    assert steps[-1] == max(m["step"] for m in metrics if "step" in m)
    assert evals and {m["step"] for m in evals} <= set(steps)
    assert plotted["validation loss"] == [[m["step"], m["val_loss"]] for m in evals]
    assert [s for s, _ in plotted[right]] == [m["step"] for m in evals]
    logged = [m["val_ppl"] if right == "validation perplexity" else m[right] for m in evals]
    assert [v for _, v in plotted[right]] == pytest.approx(logged, rel=1e-6)


def assert_perplexity_reproduces(run_dir: Path, window: int, stride: int) -> None:
    """The report's `lmforge eval perplexity` command, run as written, prints the report's number."""
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    section = report[report.index("## Reproducing the numbers"):]
    cmd, printed = re.search(r"```sh\n(lmforge eval perplexity [^\n]+)\n```\nprints `([^`]+)`", section).groups()
    args = shlex.split(cmd)
    # explicit about the window, so the number does not depend on eval perplexity's defaults
    assert (args[args.index("--max-length") + 1], args[args.index("--stride") + 1]) == (str(window), str(stride))
    number = re.search(r"perplexity (\d+\.\d+)", printed).group(1)
    summary = json.loads((run_dir / "pipeline_summary.json").read_text())
    assert f"{summary['val_perplexity']:.4f}" == number
    proc = run_cli(*args[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"perplexity (\d+\.\d+)", proc.stdout).group(1) == number
