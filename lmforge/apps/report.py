"""The run report: ``RUN_DIR/report.md`` plus PNG curves, written from what the run left on disk.

A report is built from sections (title + markdown body) that pipeline stages contribute in order; the
curves come from ``metrics.jsonl``.  matplotlib is optional: without it the report says how to get the
plots instead of failing the run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.core.io import atomic_path, atomic_write_text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def plot_curves(metrics: list[dict[str, Any]], out_png: str | Path, title: str = "") -> bool:
    """Training loss and validation loss/perplexity against step. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "val_loss" not in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, [math.exp(min(v, 50)) for v in losses], "o-", color="C1", ms=3)
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class Report:
    title: str
    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, heading: str, body: str) -> None:
        self.sections.append((heading, body.strip()))

    def render(self) -> str:
        parts = [f"# {self.title}", ""]
        for heading, body in self.sections:
            parts += [f"## {heading}", "", body, ""]
        return "\n".join(parts)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.render())
        return path


# ---- fine-tuning ---------------------------------------------------------------------------------
def _baseline_rows(baselines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"model": f"baseline: {name.replace('_', ' ')}", **{k: v for k, v in vals.items() if isinstance(v, float)}}
            for name, vals in baselines.items()]


def finetune_section(result: dict[str, Any]) -> str:
    """Markdown for one fine-tuning run (``finetune``'s result) or a comparison (``compare``'s)."""
    if "summary" in result:  # a comparison: pretrained vs random vs baselines
        metric = result["metric"]
        rows = [{"model": f"{s['init']} ({s['runs']} seeds)", f"test {metric} (mean)": s["mean"], "std": s["std"],
                 "per seed": ", ".join(f"{v:.3f}" for v in s["values"])} for s in result["summary"]]
        rows += [{"model": r["model"], f"test {metric} (mean)": r.get(metric, r.get("accuracy", r.get("exact_match")))}
                 for r in _baseline_rows(result["baselines"])]
        first = result["runs"][0]
        body = [f"Task **{result['task']}** ({first['type']}; {first['description']}) on a **{result['family']}** model.",
                "", markdown_table(rows)]
        if "pretrained_minus_random" in result:
            body += ["", f"Pretrained − random: **{result['pretrained_minus_random'] * 100:+.1f} points** of test "
                     f"{metric} (same steps, same data, mean over seeds)."]
        body += ["", "Per-run results: `runs/<init>-seed<k>/results.json`; reports there."]
        return "\n".join(body)
    r = result
    metrics = sorted({*r.get("validation", {}), *r.get("test", {})})
    rows = [{"split": split, **{k: r[split].get(k) for k in metrics}} for split in ("validation", "test") if split in r]
    sizes = ", ".join(f"{k} {v}" for k, v in r["sizes"].items())
    trunc = ", ".join(f"{k} {v}" for k, v in r["truncated"].items())
    body = [f"Task **{r['task']}** ({r['type']}, {r['description']}) on a **{r['family']}** model "
            f"({r['init']} weights, seed {r['seed']}, as {r['mode']}).",
            "", f"Examples: {sizes}. Truncated to the model's maximum length: {trunc}."]
    if r.get("closed_book") is not None:
        body += ["", f"{'Closed-book' if r['closed_book'] else 'Open-book'}: {r.get('held_out', '')}"]
    body += ["", f"Best checkpoint by {r['select_metric']}: {r['selected']}; trained {r['train_s']:.1f} s, "
             f"{r['trainable_params']:,} trainable parameters.", "", markdown_table(rows)]
    if r.get("baselines"):
        body += ["", f"Baselines on the {r.get('baselines_split', 'test')} split:", "", markdown_table(_baseline_rows(r["baselines"]))]
    if r.get("test_examples"):
        body += ["", "Test examples:", "", markdown_table(r["test_examples"])]
    return "\n".join(body)


def write_finetune_report(result: dict[str, Any]) -> Path:
    """``RUN_DIR/report.md`` (and ``curves.png`` for a single run) for ``lmforge finetune``."""
    run_dir = Path(result["run_dir"])
    report = Report(title=f"lmforge finetune — {run_dir.name}")
    if "summary" not in result:
        metrics = read_metrics(run_dir / "metrics.jsonl")
        if plot_curves(metrics, run_dir / "curves.png", title="fine-tuning"):
            report.add("Curves", "![training and validation loss](curves.png)")
    report.sections.insert(0, ("Fine-tuning", finetune_section(result)))
    return report.write(run_dir / "report.md")
