"""`lmforge eval choice`: zero/few-shot accuracy of a decoder on in-context tasks, and the in-context curve.

Choice tasks are scored by log-likelihood (:func:`lmforge.eval.choice.score_choices`: acc, acc_norm, acc_bytes);
generative tasks by greedy decoding up to a stop string, judged by the world's verifier
(:func:`lmforge.data.world.verifiers.verify`; a user file's answers by its ``check``, exact match by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from lmforge.core.tokenizer import Tokenizer
from lmforge.data.incontext import Task, check_shots, load_task, prompts
from lmforge.data.world.verifiers import verify
from lmforge.eval.choice import ChoiceItem, check_decoder, choice_metrics, score_choices
from lmforge.eval.generate import GenerationConfig, generate_text
from lmforge.eval.harness import run_harness
from lmforge.models.model_dir import train_window
from lmforge.recipes.evaluate import load_for_inference

SHOTS = (0, 1, 2, 4, 8)
"""The in-context curve's k (GPT-3's figure in miniature)."""


@dataclass
class InContextSettings:
    tasks: list[str]
    shots: list[int] = field(default_factory=lambda: [0])
    n: int = 200
    """Evaluated examples per task."""
    pool: int = 64
    """Demonstrations per world task to draw from."""
    seed: int = 1234
    """Few-shot sampling seed (lm-eval's default)."""
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    stop: list[str] = field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 16
    batch_tokens: int = 4096
    world_seed: int = 0
    max_length: int | None = None
    """Inputs longer than this are left-cut (lm-eval's ``max_length``); None: the model's positions."""


def load_decoder(path: str, device: str = "auto") -> tuple[nn.Module, Tokenizer]:
    model, tok = load_for_inference(path, device, "eval choice")
    check_decoder(model, path)
    return model, tok


def _generative(model: nn.Module, tok: Tokenizer, task: Task, contexts: Sequence[str],
                s: InContextSettings) -> dict[str, float]:
    cfg = GenerationConfig(max_new_tokens=s.max_new_tokens, temperature=0.0, stop=list(s.stop))
    results = generate_text(model, tok, list(contexts), cfg)
    right = [verify({"check": ex.check, "answer": ex.answer, "type": task.name}, r.text)
             for ex, r in zip(task.examples, results)]
    return {"exact_match": sum(right) / len(right), "n": len(right), "chance": 0.0}


def evaluate_task(model: nn.Module, tok: Tokenizer, task: Task, k: int, s: InContextSettings) -> dict[str, float]:
    contexts = prompts(task, k, seed=s.seed, description=s.description, target_delimiter=s.target_delimiter,
                       fewshot_delimiter=s.fewshot_delimiter)
    if task.generative:
        return _generative(model, tok, task, contexts, s)
    items = [ChoiceItem(c, ex.choices, ex.answer, ex.where) for c, ex in zip(contexts, task.examples)]
    return choice_metrics(score_choices(model, tok, items, target_delimiter=s.target_delimiter,
                                        batch_tokens=s.batch_tokens, max_length=s.max_length))


def evaluate_incontext(model: nn.Module, tok: Tokenizer, s: InContextSettings) -> dict[str, dict[int, dict]]:
    """``{task: {k: metrics}}`` for every task and k (every task and k checked before any scoring)."""
    tasks = [load_task(name, s.n, s.pool, world_seed=s.world_seed) for name in s.tasks]
    for task in tasks:
        for k in s.shots:
            check_shots(task, k)
    out: dict[str, dict[int, dict]] = {}
    with torch.inference_mode():
        for task in tasks:
            out[task.name] = {k: evaluate_task(model, tok, task, k, s) for k in s.shots}
    return out


def headline(metrics: dict[str, float]) -> tuple[str, float]:
    """The number a table shows: acc for choice tasks, exact match for generative ones."""
    return ("acc", metrics["acc"]) if "acc" in metrics else ("exact_match", metrics["exact_match"])


def results_table(results: dict[str, dict[int, dict]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: task, metric, chance, majority (choice tasks), one column per k."""
    shots = sorted({k for per in results.values() for k in per})
    header = ["task", "metric", "chance", "majority"] + [f"k={k}" for k in shots]
    rows = []
    for name, per in results.items():
        first = per[shots[0]]
        metric, _ = headline(first)
        majority = f"{first['majority']:.3f}" if "majority" in first else "-"
        rows.append([name, metric, f"{first['chance']:.3f}", majority] +
                    [f"{headline(per[k])[1]:.3f}" if k in per else "" for k in shots])
    return header, rows


def run_choice(args) -> dict[str, Any]:
    """The CLI's `eval choice`: settings from its flags, the model dir checked, every task and k scored."""
    model, tok = load_decoder(args.model, args.device)
    s = InContextSettings(tasks=list(args.tasks), shots=list(args.num_fewshot), n=args.limit, pool=args.pool,
                          seed=args.fewshot_seed, description=args.description or "",
                          target_delimiter=args.target_delimiter, fewshot_delimiter=args.fewshot_delimiter,
                          stop=list(args.stop) if args.stop else ["\n"], max_new_tokens=args.max_new_tokens,
                          batch_tokens=args.batch_tokens,
                          max_length=args.max_length if args.max_length is not None else train_window(args.model))
    results = evaluate_incontext(model, tok, s)
    return {"model": args.model, "max_length": s.max_length,
            "results": {t: {str(k): m for k, m in per.items()} for t, per in results.items()},
            "table": results_table(results)}


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns aligned for a terminal."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows)


def run_harness_command(args) -> dict[str, Any]:
    """The CLI's `eval harness`: lm-eval's simple_evaluate on the model dir (lmforge's model type by default)."""
    return run_harness(args.model, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                       include_path=args.include_path, device=args.device, batch_tokens=args.batch_tokens,
                       fewshot_seed=args.fewshot_seed, log_samples=args.log_samples, model_type=args.model_type,
                       gen_kwargs=args.gen_kwargs)
