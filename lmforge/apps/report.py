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
