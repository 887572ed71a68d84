"""What a run reports: ``metrics.jsonl``, TensorBoard, and a progress display on stderr.

- ``RUN_DIR/metrics.jsonl``: one JSON object per logged step, appended and flushed line by line (a run
  killed mid-write leaves at most one torn last line, which resume drops).
- ``RUN_DIR/tb/``: the same numbers as TensorBoard scalars, when ``torch.utils.tensorboard`` imports.
- stderr: a rich progress bar (step/max_steps, loss, tokens/s, ETA) when stderr is a terminal; otherwise
  one plain line per logged step, so log files stay readable.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def _clean(value: Any) -> Any:
    """JSON-safe numbers (NaN/inf as strings, so every line stays valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and mirrors numeric fields to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: pip install -e ".[tb]"
            except ImportError:  # tensorboard not installed: metrics.jsonl is enough
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def format_record(record: dict[str, Any], max_steps: int) -> str:
    """One human line for a metrics record."""
    parts = [f"step {record.get('step', 0)}/{max_steps}"]
    for key, fmt in (("loss", "{:.4f}"), ("val_loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}")):
        v = record.get(key)
        if isinstance(v, (int, float)):
            parts.append(f"{key} {fmt.format(v)}")
    if isinstance(record.get("tokens_per_s"), (int, float)):
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("skipped_steps"):  # train.nonfinite=skip (or fp16's scaler) dropped updates: say so
        parts.append(f"skipped steps {record['skipped_steps']}")
    for key, v in record.items():
        if key.startswith("val_") and key != "val_loss" and isinstance(v, (int, float)):
            parts.append(f"{key} {v:.4g}")
    return " | ".join(parts)


class Progress:
    """Progress on stderr: a rich bar on a terminal, else a plain line per :meth:`report`.

    ``enabled``: None = automatic (rich bar if stderr is a TTY and rich imports), False = silent.
    """

    def __init__(self, max_steps: int, start_step: int = 0, enabled: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.max_steps = max_steps
        self.start_step = start_step
        self.stream = stream or sys.stderr
        self.silent = enabled is False
        self._t0 = time.perf_counter()
        self._bar = None
        self._task = None
        interactive = enabled is None and hasattr(self.stream, "isatty") and self.stream.isatty()
        if interactive and not self.silent:
            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task("train", total=max_steps, completed=start_step, info="")
            self._bar.start()

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def report(self, record: dict[str, Any]) -> None:
        """Show a logged record: update the bar's text, or print a plain line with an ETA."""
        if self.silent:
            return
        if self._bar is not None:
            info = []
            if isinstance(record.get("loss"), (int, float)):
                info.append(f"loss {record['loss']:.4f}")
            if isinstance(record.get("val_loss"), (int, float)):
                info.append(f"val {record['val_loss']:.4f}")
            if isinstance(record.get("tokens_per_s"), (int, float)):
                info.append(f"{record['tokens_per_s']:,.0f} tok/s")
            self._bar.update(self._task, completed=record.get("step", 0), info=" ".join(info))
            if "val_loss" in record:  # keep the validation history on screen above the bar
                self._bar.console.print(format_record(record, self.max_steps))
            return
        step = record.get("step", 0)
        done = step - self.start_step
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self.max_steps - step) if done > 0 else float("nan")
        line = format_record(record, self.max_steps)
        if math.isfinite(eta):
            line += f" | eta {_fmt_duration(eta)}"
        print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.silent:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
