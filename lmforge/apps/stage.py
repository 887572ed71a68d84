"""What a stage of `lmforge pipeline` is given and what it declares, apart from the pipeline itself.

A stage is a function of a :class:`Context` (the resolved config, the report being written, the run dir, what
earlier stages measured); it adds its section to ``ctx.report`` and its numbers to ``ctx.results``.  Stages that
belong to a later part of the life cycle (SFT, preferences, RL, in-context scoring) live in modules of their own
(``lmforge/apps/stage_*.py``) and import only this file, so the pipeline module lists them without an import cycle.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lmforge.apps.report import Report


@dataclass
class Context:
    cfg: Any
    """The resolved :class:`lmforge.apps.pipeline.PipelineConfig`."""
    report: Report
    run_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    parts: Any = None
    """The pretraining parts (model, tokenizer, shards) from the data stage."""
    reproduce: list[tuple[str, str]] = field(default_factory=list)
    """(number as the report prints it, the command that prints it again), for the report's last section."""


@dataclass
class Stage:
    name: str
    run: Callable[[Context], None]
    describe: Callable[[Context], str]
    """One line for the stage's banner: what it does."""
    estimate: Callable[[Context], Optional[float]] = lambda ctx: None
    """Its seconds from what earlier stages measured; None: nothing measured yet."""


def say(text: str) -> None:
    """The pipeline's own lines, on stderr beside the Trainer's progress (stdout keeps the final JSON line)."""
    print(text, file=sys.stderr, flush=True)


def world_seed(source: str) -> int:
    """The seed of a built-in world source (``world`` is seed 0, ``world:N`` seed N): the world whose facts the
    pretrained model learnt, which its tasks and instructions must come from."""
    return int(source.split(":", 1)[1]) if source.startswith("world:") else 0
