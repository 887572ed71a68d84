"""`lmforge scaling sweep CONFIG`: an IsoFLOP grid of pretraining runs, compute budgets × model sizes.

For each budget ``C`` (training FLOPs) and each model size the sweep trains one model for ``D = C / F`` tokens, where
``F`` is the model's training FLOPs per token (:func:`lmforge.recipes.pretrain.run_flops_per_token`, the family's own
formula), so every run of one budget costs the same compute: the IsoFLOP curves of Hoffmann et al. 2022 (§3.2).
Each run is a plain ``lmforge pretrain`` (:mod:`lmforge.recipes.pretrain`) in a process of its own, from the base
pretraining config with the size's ``model.*`` keys, ``max_steps`` for its token budget and the learning-rate
schedule scaled to it (warmup a fraction of the run, cosine to the end), so nothing about training is re-implemented
here.  Every run:

- reads fresh tokens: its ``D`` must not exceed one epoch of the training shards (checked before any run starts;
  the fix is more data), so no token is seen twice;
- shares one tokenizer (trained once into ``RUN_DIR/tokenizer``) and one validation set, so losses compare;
- records its final validation loss, ``N`` (non-embedding or total parameters: the ``n_params`` option, recorded
  with every point, both counts kept), ``D`` and ``C`` in ``RUN_DIR/points.jsonl`` and ``points.csv`` (what
  ``lmforge scaling fit`` reads).

Runs go ``jobs`` at a time (each with ``OMP_NUM_THREADS`` = cores / jobs unless set); a run whose directory holds
the stamp of the same command is reused; one cut off is resumed from its last checkpoint (``resume=auto``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.core.config import load_config, split_config_arg, to_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.io import atomic_write_json, atomic_write_text
from lmforge.data.shards import build_shards
from lmforge.models.families.base import model_params
from lmforge.recipes.pretrain import (PretrainConfig, model_config_for, resolve_tokenizer, run_flops_per_token,
                                      train_window_of)

STAMP = "sweep-command.json"
"""Written into a run's directory when it finishes: the command that made it (its presence means done)."""


@dataclass
class ScalingSweepConfig:
    run_dir: str = "runs/scaling-sweep"
    pretrain: str = "configs/tiny-gpt2.yaml"
    """The pretraining config every run starts from (data, tokenizer, optimizer, batch size, seq_len)."""
    overrides: list[str] = field(default_factory=list)
    """Extra ``key=value`` pretraining overrides for every run (e.g. ``train.lr=2e-3``)."""
    budgets: list[float] = field(default_factory=lambda: [1e11, 3e11, 1e12])
    """Training compute budgets C in FLOPs (one IsoFLOP curve each)."""
    sizes: list[dict[str, Any]] = field(default_factory=list)
    """Model sizes: each a dict of ``model.*`` keys (e.g. ``{d_model: 64, n_layer: 2, n_head: 2}``)."""
    n_params: Literal["non_embedding", "total"] = "non_embedding"
    """Which N the points (and fits) use: parameters without the token/position embeddings (Kaplan et al. 2020;
    a decoder's LM head is counted), or all of them.  Both counts are recorded with every point."""
    min_steps: int = 20
    """A (budget, size) pair whose token budget is fewer optimizer steps than this is left out of that budget's
    curve (too short to train); a budget left with no size is an error."""
    warmup_fraction: float = 0.05
    """Warmup as a fraction of each run's steps (the schedule is scaled to the run's token budget)."""
    jobs: int = 1
    """Runs at a time, each its own process."""
    timeout_s: int = 7200
    """Per-run time limit."""
    reuse: bool = True
    """A run whose directory holds the stamp of the same command is read, not run again."""
    bootstrap: int = 100
    """Bootstrap resamples for approach 3's intervals in the sweep's report (``lmforge scaling fit`` refits at will)."""

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ConfigError("budgets: name at least one compute budget in FLOPs (e.g. budgets=[1e11,3e11,1e12])")
        for i, c in enumerate(self.budgets):
            if not isinstance(c, (int, float)) or isinstance(c, bool) or not c > 0:
                raise ConfigError(f"budgets[{i}]={c!r} must be a positive number of FLOPs (e.g. 1e12)")
        if self.jobs < 1:
            raise ConfigError(f"jobs={self.jobs} must be >= 1")
        if self.min_steps < 1:
            raise ConfigError(f"min_steps={self.min_steps} must be >= 1")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1) (e.g. 0.05)")


@dataclass
class PlannedRun:
    budget: float
    size: dict[str, Any]
    name: str
    n_non_embedding: int
    n_total: int
    flops_per_token: int
    steps: int
    tokens: int
    overrides: list[str]

    @property
    def run_dir(self) -> str:
        return self.overrides[0].split("=", 1)[1]


def size_name(size: dict[str, Any]) -> str:
    """A size's short name for run directories: ``d64-L2-h2`` from ``{d_model: 64, n_layer: 2, n_head: 2}``."""
    short = {"d_model": "d", "n_layer": "L", "n_head": "h", "ffn_dim": "f", "n_kv_head": "kv"}
    return "-".join(f"{short.get(k, k)}{v}" for k, v in size.items())


def _size_overrides(size: dict[str, Any]) -> list[str]:
    return [f"model.{k}={v}" for k, v in size.items()]


def base_config(cfg: ScalingSweepConfig, extra: list[str] | None = None) -> PretrainConfig:
    if not Path(cfg.pretrain).is_file():
        raise ConfigError(f"pretrain='{cfg.pretrain}' is not a file; point it at a pretraining config "
                          f"(e.g. configs/tiny-gpt2.yaml)")
    return load_config(PretrainConfig, cfg.pretrain, [*cfg.overrides, *(extra or [])])


def plan(cfg: ScalingSweepConfig) -> list[PlannedRun]:
    """Every (budget, size) run of the grid, with its steps for the budget's tokens; checks the grid is usable:
    each budget fits the smallest model and keeps at least three sizes (approach 2 fits a parabola per budget)."""
    if len(cfg.sizes) < 3:
        raise ConfigError(f"sizes: {len(cfg.sizes)} given; an IsoFLOP curve needs at least three model sizes "
                          f"(approach 2 fits a parabola in log N per budget)")
    base = base_config(cfg)
    rows_per_step = base.train.global_batch_size * train_window_of(base)  # tokens per optimizer step
    runs: list[PlannedRun] = []
    for budget in cfg.budgets:
        kept = []
        smallest = None
        for size in cfg.sizes:
            sized = base_config(cfg, _size_overrides(size))
            model_cfg = sized.model
            fpt = run_flops_per_token(sized)
            if fpt is None:
                raise ConfigError(f"model.family={model_cfg.family!r} registers no FLOP formula (Family.flops); a "
                                  f"scaling sweep needs one to size its runs")
            fpt = int(round(fpt))
            n_ne, n_tot = model_params(model_cfg, True), model_params(model_cfg, False)
            steps = int(budget // (fpt * rows_per_step))
            if smallest is None or fpt < smallest[0]:
                smallest = (fpt, size)
            if steps < cfg.min_steps:
                continue
            name = f"C{budget:.2e}-{size_name(size)}".replace("+", "")
            run_dir = Path(cfg.run_dir) / "runs" / name
            warmup = max(1, round(cfg.warmup_fraction * steps)) if cfg.warmup_fraction > 0 else 0
            overrides = [f"run_dir={run_dir}", f"max_steps={steps}", f"train.warmup_steps={warmup}",
                         "train.eval_every=0", f"train.ckpt_every={max(1, steps // 4)}", "resume=auto",
                         f"tokenizer.path={Path(cfg.run_dir) / 'tokenizer'}", *cfg.overrides, *_size_overrides(size)]
            kept.append(PlannedRun(budget, dict(size), name, n_ne, n_tot, fpt, steps, steps * rows_per_step,
                                   overrides))
        if not kept:
            fpt, size = smallest
            need = fpt * rows_per_step * cfg.min_steps
            raise ConfigError(f"budgets: {budget:.3g} FLOPs cannot fit the smallest model ({size_name(smallest[1])}: "
                              f"{fpt:,} FLOPs/token × {rows_per_step:,} tokens/step × min_steps={cfg.min_steps} "
                              f"= {need:.3g} FLOPs); raise the budget to >= {need:.3g} or add a smaller size")
        if len(kept) < 3:
            raise ConfigError(f"budgets: {budget:.3g} FLOPs fits only {len(kept)} model size(s) "
                              f"({', '.join(r.name for r in kept)}) with >= min_steps={cfg.min_steps} steps; "
                              f"approach 2 needs three per budget: raise the budget or add smaller sizes")
        runs.extend(kept)
    return runs


def prepare_data(cfg: ScalingSweepConfig, runs: list[PlannedRun]) -> dict[str, Any]:
    """Train the sweep's one tokenizer (``RUN_DIR/tokenizer``), build the shards every run reads (cached), and check
    that the longest run sees each training token at most once."""
    base = base_config(cfg, [f"run_dir={cfg.run_dir}"])
    tokenizer = resolve_tokenizer(base, resuming=True)
    shards = build_shards(base.data.source, tokenizer, base.data.cache_dir, field=base.data.field,
                          val_fraction=base.data.val_fraction, num_workers=base.data.num_workers, seed=base.seed,
                          world_bytes=base.data.world_bytes, txt_split=base.data.txt_split)
    train_tokens = shards.num_tokens("train")
    longest = max(runs, key=lambda r: r.tokens)
    if longest.tokens > train_tokens:
        more = math.ceil(longest.tokens / train_tokens * 1.1 * base.data.world_bytes)
        hint = (f"raise data.world_bytes to >= {more}" if base.data.source == "world"
                else "give the runs more data (data.source)")
        raise ConfigError(f"budgets: the run {longest.name} needs {longest.tokens:,} fresh tokens but the training "
                          f"shards hold {train_tokens:,} (each run must see every token at most once); {hint} or "
                          f"lower the largest budget")
    model_config_for(base.model, tokenizer)  # the tokenizer fits the model's vocabulary (else one clear line)
    return {"train_tokens": train_tokens, "val_tokens": shards.num_tokens("val"), "vocab_size": tokenizer.vocab_size}


def _final_val_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    if not vals:
        raise LmforgeError(f"scaling sweep: {run_dir} logged no val_loss; give the data a validation split "
                           f"(data.val_fraction > 0)")
    return float(vals[-1])


def _run_one(cfg: ScalingSweepConfig, run: PlannedRun, threads: int | None) -> dict[str, Any]:
    run_dir = Path(run.run_dir)
    args = [sys.executable, "-m", "lmforge", "pretrain", cfg.pretrain, *run.overrides]
    command = json.dumps(args[1:])
    stamp = run_dir / STAMP
    reused = cfg.reuse and stamp.is_file() and stamp.read_text(encoding="utf-8") == command
    t0 = time.perf_counter()
    if not reused:
        if stamp.is_file():  # a finished run of another command, made by the sweep: replaced
            shutil.rmtree(run_dir)
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{run.name}.log", "w", encoding="utf-8") as log:
            try:
                proc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=cfg.timeout_s)
            except subprocess.TimeoutExpired:
                raise LmforgeError(f"scaling sweep: run {run.name} took longer than timeout_s={cfg.timeout_s}; raise "
                                   f"timeout_s (a rerun resumes it)") from None
        if proc.returncode != 0:
            lines = (run_dir.parent / f"{run.name}.log").read_text(encoding="utf-8", errors="replace").splitlines()
            tail = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "(none)")
            raise LmforgeError(f"scaling sweep: run {run.name} failed: {tail}; its log: "
                               f"{run_dir.parent / (run.name + '.log')}")
        atomic_write_text(stamp, command)
    return {"budget": run.budget, "name": run.name, "size": run.size, "n_params": cfg.n_params,
            "N": run.n_non_embedding if cfg.n_params == "non_embedding" else run.n_total,
            "N_non_embedding": run.n_non_embedding, "N_total": run.n_total, "D": run.tokens,
            "C": run.flops_per_token * run.tokens, "flops_per_token": run.flops_per_token, "steps": run.steps,
            "loss": _final_val_loss(run_dir), "run_dir": str(run_dir), "reused": reused,
            "wall_s": time.perf_counter() - t0}


POINT_COLUMNS = ("budget", "name", "N", "D", "C", "loss", "n_params", "N_non_embedding", "N_total",
                 "flops_per_token", "steps")


def write_points(run_dir: Path, points: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / "points.jsonl", "".join(json.dumps(p) + "\n" for p in points))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=POINT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(points)
    atomic_write_text(run_dir / "points.csv", buf.getvalue())


def sweep(cfg: ScalingSweepConfig, say=lambda _text: None) -> dict[str, Any]:
    """Run the grid (finished runs reused) and return its points (also in ``RUN_DIR/points.jsonl``/``.csv``)."""
    runs = plan(cfg)
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, runs)
    say(f"scaling sweep: {len(runs)} runs over {len(cfg.budgets)} budgets; {data['train_tokens']:,} training tokens, "
        f"the longest run reads {max(r.tokens for r in runs):,}")
    threads = None
    if cfg.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    points: dict[str, dict[str, Any]] = {}
    finished = itertools.count(1)  # next() on a count is atomic: worker threads number their lines without a lock

    def one(run: PlannedRun) -> dict[str, Any]:
        point = _run_one(cfg, run, threads)
        points[run.name] = point
        write_points(root, [points[r.name] for r in runs if r.name in points])  # progress kept as runs finish
        done = next(finished)
        how = "reused" if point["reused"] else f"{point['wall_s']:.0f} s"
        say(f"[{done}/{len(runs)}] {run.name}: N={point['N']:,} D={point['D']:,} loss {point['loss']:.4f} "
            f"({how})")
        return point

    # the longest runs first, so jobs side by side finish together
    order = sorted(runs, key=lambda r: -r.budget)
    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:  # threads only wait on the runs' processes
        list(pool.map(one, order))
    ordered = [points[r.name] for r in runs]
    write_points(root, ordered)
    out = {"run_dir": cfg.run_dir, "n_params": cfg.n_params, "points": ordered, "data": data, "config": to_dict(cfg)}
    atomic_write_json(root / "sweep.json", out)
    return out


def run_scaling_sweep(config_path: str | None, overrides: list[str], say=lambda _text: None) -> dict[str, Any]:
    return sweep(load_config(ScalingSweepConfig, *split_config_arg(config_path, overrides)), say)

