"""The pipeline's in-context stage: zero- and few-shot accuracy of the pretrained model on world tasks, beside chance.

Choice tasks scored by log-likelihood as lm-evaluation-harness scores them (:mod:`lmforge.recipes.incontext`), on
the model in memory right after pretraining, inputs cut to the window it was trained on.  Decoders only: an
encoder (bert) has no next-token distribution to score an answer with, and an encoder-decoder (t5) was pretrained on
span corruption, so its likelihood of an answer after a prompt is not the quantity lm-eval's tables report; the
stage says so in one line instead of a table.  ``lmforge eval choice`` prints the same numbers (the report gives
the command).
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from typing import Optional

from lmforge.apps.stage import Context, Stage, say
from lmforge.core.io import atomic_write_json
from lmforge.models.families import family_of
from lmforge.recipes.incontext import InContextSettings, evaluate_incontext, headline

RESULTS_FILE = "incontext.json"


@dataclass
class PipelineInContextConfig:
    """The pipeline's in-context stage (``lmforge eval choice`` does more)."""

    enabled: bool = True
    tasks: list[str] = field(default_factory=lambda: ["world-fact", "world-arithmetic", "world-kind",
                                                      "world-true-false", "world-sentiment"])
    shots: list[int] = field(default_factory=lambda: [0, 1, 4])
    n: int = 100
    """Evaluated examples per task."""


def _command(ctx: Context, s: InContextSettings) -> str:
    return shlex.join(["lmforge", "eval", "choice", "--model", str(ctx.run_dir / "model"), "--tasks", *s.tasks,
                       "-k", *map(str, s.shots), "--limit", str(s.n)])


def stage_incontext(ctx: Context) -> None:
    c = ctx.cfg.incontext
    if not c.enabled:
        return
    model, tok = ctx.parts.model.eval(), ctx.parts.tokenizer
    family = family_of(model)
    if family.kind != "decoder":
        why = ("an encoder has no next-token distribution to score an answer after a prompt with"
               if family.kind == "encoder" else
               "it was pretrained on span corruption, so its likelihood of an answer after a prompt is not what "
               "lm-eval's zero/few-shot tables measure")
        ctx.report.add("In-context (zero/few-shot)", f"Not scored for {family.name}: {why}.")
        ctx.results["incontext"] = None
        return
    s = InContextSettings(tasks=list(c.tasks), shots=list(c.shots), n=c.n, max_length=ctx.cfg.data.seq_len)
    t = time.perf_counter()
    results = evaluate_incontext(model, tok, s)
    took = time.perf_counter() - t
    rows = []
    for task, per in results.items():
        metric, _ = headline(per[s.shots[0]])
        first = per[s.shots[0]]
        majority = f"{first['majority']:.3f}" if "majority" in first else "-"
        rows.append("| " + " | ".join([task, metric, f"{first['chance']:.3f}", majority] +
                                      [f"{headline(per[k])[1]:.3f}" for k in s.shots]) + " |")
    header = "| task | metric | chance | majority | " + " | ".join(f"k={k}" for k in s.shots) + " |"
    table = "\n".join([header, "|" + "---|" * (4 + len(s.shots)), *rows])
    command = _command(ctx, s)
    body = (f"{table}\n\nAccuracy of the pretrained model on {s.n} validation questions per world task, each "
            f"choice scored by its log-likelihood after a `Q: ...\\nA:` prompt with k demonstrations (seed "
            f"{s.seed}) as lm-evaluation-harness scores multiple choice (`acc`); chance is 1 / the number of "
            f"choices, majority the share of the most frequent answer (what always giving one answer scores).  "
            f"Inputs cut to the {s.max_length}-token window the model was trained on.  {took:.0f} s.  "
            f"The same numbers: `{command}`.")
    ctx.report.add("In-context (zero/few-shot)", body)
    data = {task: {str(k): m for k, m in per.items()} for task, per in results.items()}
    atomic_write_json(ctx.run_dir / RESULTS_FILE, {"shots": s.shots, "n": s.n, "max_length": s.max_length,
                                                   "results": data, "command": command})
    ctx.results["incontext"] = data
    first = s.tasks[0]
    ctx.reproduce.append((f"the in-context table ({first}: acc {headline(results[first][s.shots[0]])[1]:.3f} at "
                          f"k={s.shots[0]}, ...)", command))
    say("in-context: " + ", ".join(f"{task} k={s.shots[0]} {headline(per[s.shots[0]])[1]:.2f} → "
                                    f"k={s.shots[-1]} {headline(per[s.shots[-1]])[1]:.2f}"
                                    for task, per in results.items()))


def _estimate(ctx: Context) -> Optional[float]:
    c, rate = ctx.cfg.incontext, ctx.results.get("throughput")
    if not c.enabled:
        return 0.0
    if not rate:
        return None
    # forward passes only (about a third of a training step's work per token), about half a window of prompt and
    # choices per question and k
    return len(c.tasks) * len(c.shots) * c.n * ctx.cfg.data.seq_len / 2 / (3 * rate)


def _describe(ctx: Context) -> str:
    c = ctx.cfg.incontext
    if not c.enabled:
        return "skipped (incontext.enabled=false)"
    return (f"zero/few-shot accuracy (k = {', '.join(map(str, c.shots))}) on {len(c.tasks)} world tasks by "
            f"log-likelihood, beside chance")


STAGE = Stage("in-context", stage_incontext, _describe, _estimate)
