"""`lmforge eval instructions`: exact match per task type on the world's held-out instruction splits.

An SFT model (``--model``) answers zero-shot in its chat template; its base model (``--base``, optional) answers
the same records zero-shot and few-shot (``shots`` solved records of the same type in front, from the train
entities), in its own template if it has one, else the plain ``Q:``/``A:`` form (:mod:`lmforge.eval.instructions`).
Three splits, each holding out one thing (:mod:`lmforge.data.world.instructions`): ``test_entities`` (seen types
and phrasings, unseen entities), ``test_phrasings`` (the fourth phrasing, never trained on), ``test_types`` (task
types no SFT record has: reverse, compare, true_false).  In-context and closed-book types are averaged apart: a
closed-book answer needs facts pretraining had to teach, which instruction tuning cannot add.

The records are those of ``seed`` -- the seed the SFT data was built with, since the entity split follows it.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.core.errors import ConfigError, ModelError
from lmforge.data.world.instructions import (CLOSED_BOOK, HELD_OUT_TYPES, IN_CONTEXT, INSTRUCTION_TYPES,
                                             build_instructions)
from lmforge.eval.instructions import InstructionScores, accuracy, choice_accuracy, score_instructions, solved
from lmforge.models.families import get_family
from lmforge.models.io import load_model
from lmforge.recipes.finetune import resolve_model_dir

EVAL_SPLITS = ("test_entities", "test_phrasings", "test_types")
KINDS = (IN_CONTEXT, CLOSED_BOOK)



def load_decoder(path: str, what: str) -> tuple[torch.nn.Module, Any, str]:
    model_dir = resolve_model_dir(path)
    model, tokenizer = load_model(model_dir)
    if tokenizer is None:
        raise ModelError(f"{what} '{path}' has no tokenizer.json; eval instructions needs the model's tokenizer")
    if get_family(model.config.family).kind != "decoder" or hasattr(model, "backbone"):
        raise ConfigError(f"{what} '{path}' is not a decoder language model; eval instructions generates answers "
                          f"with decoders (gpt2, llama)")
    return model.eval(), tokenizer, str(model_dir)


def plain_answer(record: dict[str, Any]) -> str:
    """The record's answer as a reply's first line, without tone (what a demonstration shows)."""
    a = record["answer"]
    return ", ".join(a) if isinstance(a, list) else str(a)


def demonstrations(shots: int, seed: int, world_seed: int) -> dict[str, list[list[dict[str, str]]]]:
    """``shots`` solved records per task type, held-out types included, from the train entities (so no demo names
    a test entity)."""
    if shots == 0:
        return {}
    return {name: [solved(r, plain_answer(r)) for r in
                   build_instructions("train", shots, seed=seed, world_seed=world_seed, types=[name], held_out=())]
            for name in INSTRUCTION_TYPES}


def eval_records(n_per_type: int, seed: int, world_seed: int) -> dict[str, list[dict[str, Any]]]:
    return {split: build_instructions(split, n_per_type, seed=seed, world_seed=world_seed) for split in EVAL_SPLITS}


def _by_type(scores: InstructionScores) -> dict[str, float | None]:
    groups: dict[str, list] = {}
    for s in scores.scored:
        groups.setdefault(s.record["type"], []).append(s)
    return {t: accuracy(g) for t, g in groups.items()}


def _score_all(model, tokenizer, records, **kw) -> tuple[dict[str, dict[str, float | None]], dict[str, Any]]:
    per_split, scored = {}, {}
    for split, recs in records.items():
        scores = score_instructions(model, tokenizer, recs, **kw)
        per_split[split] = _by_type(scores)
        scored[split] = scores
    return per_split, scored


def summarise(rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """Per split and kind, each column's mean exact match over task types (types weigh alike)."""
    out = []
    for split in EVAL_SPLITS:
        for kind in KINDS:
            group = [r for r in rows if r["split"] == split and r["kind"] == kind]
            if not group:
                continue
            row = {"split": split, "kind": kind, "types": len(group)}
            for c in columns:
                vals = [r[c] for r in group if r.get(c) is not None]
                row[c] = sum(vals) / len(vals) if vals else None
            out.append(row)
    return out


def evaluate_instructions(model: str, base: str | None = None, n_per_type: int = 20, shots: int = 3,
                          seed: int = 0, world_seed: int = 0, max_new_tokens: int = 48, samples: int = 4,
                          batch_size: int = 32) -> dict[str, Any]:
    """Exact match per (split, task type) for ``model`` and, given ``base``, the base model zero- and few-shot;
    per-kind means; a few of ``model``'s replies as chat samples."""
    if n_per_type < 1:
        raise ConfigError(f"n_per_type={n_per_type} must be >= 1")
    if shots < 0:
        raise ConfigError(f"shots={shots} must be >= 0")
    records = eval_records(n_per_type, seed, world_seed)
    kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    m, tok, model_dir = load_decoder(model, "--model")
    results: dict[str, dict] = {}
    results["sft"], scored = _score_all(m, tok, records, **kw)
    skipped = {"sft": sum(s.skipped for s in scored.values())}
    chat = [{"split": split, "type": s.record["type"], "prompt": s.record["messages"][-2]["content"],
             "reply": s.reply, "answer": plain_answer(s.record), "correct": s.correct}
            for split in ("test_entities", "test_types") for s in scored[split].scored[:samples // 2 or 1]]
    base_dir, columns, chance = None, ["sft"], {}
    if base is not None:
        b, btok, base_dir = load_decoder(base, "--base")
        results["base_zero"], s0 = _score_all(b, btok, records, **kw)
        results["base_few"], s1 = _score_all(b, btok, records, demos=demonstrations(shots, seed, world_seed),
                                             shots=shots, **kw)
        skipped.update(base_zero=sum(s.skipped for s in s0.values()), base_few=sum(s.skipped for s in s1.values()))
        columns += ["base_zero", "base_few", "base_likelihood"]
        # closed-book types by likelihood among candidate answers, after the few-shot prompt (chance beside it)
        closed = {split: [r for r in recs if r["kind"] == CLOSED_BOOK] for split, recs in records.items()}
        choice = {split: choice_accuracy(b, btok, recs, demonstrations(shots, seed, world_seed), shots)
                  for split, recs in closed.items()}
        results["base_likelihood"] = {split: {t: v["acc"] for t, v in c.items()} for split, c in choice.items()}
        chance = {split: {t: v["chance"] for t, v in c.items()} for split, c in choice.items()}
    rows = []
    for split, recs in records.items():
        for name in dict.fromkeys(r["type"] for r in sorted(recs, key=lambda r: list(INSTRUCTION_TYPES).index(
                r["type"]))):
            row = {"split": split, "type": name, "kind": INSTRUCTION_TYPES[name].kind,
                   "n": sum(r["type"] == name for r in recs)}
            row.update({c: results[c][split].get(name) for c in columns})
            if "base_likelihood" in columns:
                row["chance"] = chance[split].get(name)
            rows.append(row)
    return {"model": model_dir, "base": base_dir, "n_per_type": n_per_type, "shots": shots, "seed": seed,
            "world_seed": world_seed, "held_out_types": list(HELD_OUT_TYPES), "columns": columns, "rows": rows,
            "summary": summarise(rows, columns), "skipped": skipped, "samples": chat}


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The calibration numbers: per split and kind, ``<split>/<kind>/<column>`` -> mean exact match."""
    return {f"{r['split']}/{r['kind']}/{c}": r[c] for r in result["summary"] for c in result["columns"]}
