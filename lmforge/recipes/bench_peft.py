"""`lmforge bench peft`: full fine-tuning and every delta method on one model and task, side by side.

Each (method, seed) is one fine-tuning run (:func:`lmforge.recipes.finetune.run_finetune`, what ``lmforge finetune``
runs) in a process of its own (so memory and time are the method's own), from the same fine-tuning config with ``peft.*`` set per method,
``train.lr`` where the bench names one (else the run takes the method's default learning rate) and
``measure_memory=true``.  The table (``RUN_DIR/report.md``, ``bench.json``) has per method: trainable
parameters (count, %), validation and test accuracy (mean ± std over seeds), training memory (parameters +
gradients + optimizer state + saved activations, counted by :mod:`lmforge.train.memory`), seconds per step,
tokens/s, saved file size, and steps to reach 95% of the method's best validation accuracy;
``bench.png`` plots accuracy and memory per method (both written by :mod:`lmforge.apps.report`).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lmforge.core.config import load_config, split_config_arg, to_dict
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.io import atomic_write_json, atomic_write_text
from lmforge.core.outputs import describe, entries, read_marker, write_marker
from lmforge.recipes.finetune import load_finetune_config, run_finetune

# method name in the table -> the fine-tuning overrides that select it
# (a delta keeps BERT's pretrained pooler, frozen as in PEFT: a fine-tuning config's head.reinit_pooler is for full
# fine-tuning only)
_DELTA = ["head.reinit_pooler=false"]
METHOD_ARGS: dict[str, list[str]] = {
    "full": [],
    "lora": ["peft.method=lora", *_DELTA],
    "dora": ["peft.method=dora", *_DELTA],
    "houlsby": ["peft.method=adapter", "peft.adapter_type=houlsby", *_DELTA],
    "pfeiffer": ["peft.method=adapter", "peft.adapter_type=pfeiffer", *_DELTA],
    "bitfit": ["peft.method=bitfit", *_DELTA],
    "ladder": ["peft.method=ladder", *_DELTA],
    "prefix": ["peft.method=prefix", *_DELTA],
    "prompt": ["peft.method=prompt", *_DELTA],
}


@dataclass
class BenchPeftConfig:
    run_dir: str = "runs/bench-peft"
    finetune: str = "configs/finetune-gpt2-sentiment.yaml"
    """The fine-tuning config every run starts from (model, task, steps, full fine-tuning's lr)."""
    methods: list[str] = field(default_factory=lambda: list(METHOD_ARGS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr: dict[str, float] = field(default_factory=dict)
    """Learning rate per method; a method not named uses ``delta_lr`` (full: the fine-tuning config's)."""
    delta_lr: Optional[float] = None
    """Learning rate of the delta methods ``lr`` does not name (None: each method's own default, as ``lmforge
    finetune`` resolves it without ``train.lr``: :mod:`lmforge.delta.registry`'s ``train_defaults``)."""
    overrides: list[str] = field(default_factory=list)
    """Extra ``key=value`` fine-tuning overrides for every run (e.g. ``max_steps=100``, ``model=runs/x``)."""
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Further overrides for one method's runs, applied after ``overrides`` and the method's own selection (e.g.
    ``{bitfit: [max_steps=2000]}``, or BERT's fresh pooler trained with a delta: ``[peft.method=bitfit+modules,
    peft.train_modules=[pooler], head.reinit_pooler=true]``); the table keeps the method's name."""
    timeout_s: int = 3600
    """Per-run time limit."""
    jobs: int = 1
    """Runs at a time, each its own process.  With ``jobs > 1`` each run gets ``OMP_NUM_THREADS`` = CPU cores /
    jobs (unless the environment sets it), so the per-step times in the table are those of a share of the
    machine; compare methods within one table, not across tables run with different ``jobs``."""
    reuse: bool = True
    """A (method, seed) whose run directory already holds the results of the same command is read, not run again:
    an interrupted bench, or one extended with more seeds or methods, picks up where it stopped.  A run directory
    from a different command (or cut off before it finished) is replaced, if the bench made it (its ``lmforge.json``
    says so); a directory there that the bench did not make is refused, never deleted."""


def _finetune_lr(cfg: BenchPeftConfig) -> float:
    return load_finetune_config(cfg.finetune, list(cfg.overrides)).train.lr


def _method_lr(cfg: BenchPeftConfig, method: str, full_lr: float) -> float | None:
    """The ``train.lr`` the bench gives ``method``'s runs; None: none, the run resolves the method's default."""
    if method in cfg.lr:
        return float(cfg.lr[method])
    if method == "full":
        return full_lr
    return float(cfg.delta_lr) if cfg.delta_lr is not None else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _steps_to_95(rows: list[dict[str, Any]], key: str = "val_accuracy") -> int | None:
    evals = [(r["step"], r[key]) for r in rows if key in r]
    if not evals:
        return None
    best = max(v for _, v in evals)
    return next(s for s, v in evals if v >= 0.95 * best)


def _s_per_step(rows: list[dict[str, Any]]) -> float | None:
    """Median training time per step between consecutive log lines, leaving out intervals that ended with a
    validation pass (so evaluation, loading and saving do not count)."""
    logged = [r for r in rows if "elapsed_s" in r and "step" in r]
    per = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]) for a, b in zip(logged, logged[1:])
           if b["step"] > a["step"] and not any(k.startswith("val_") for k in b)]
    return statistics.median(per) if per else None


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


def _finetune_process(config: str, overrides: list[str], stderr_path: str, threads: int | None,
                      run_report: Callable[[dict[str, Any]], Any] | None) -> None:
    """One fine-tuning run, in a spawned process of its own: ``lmforge finetune CONFIG OVERRIDES`` without the
    command line.  Its stdout is dropped and its stderr goes to ``stderr_path``; a user error ends it with the
    CLI's ``error: ...`` line and exit status (any other exception with its traceback, status 1)."""
    for fd, path in ((1, os.devnull), (2, stderr_path)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    if threads is not None:  # torch is imported already (with this module): set its pool, not just the variable
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    try:
        result = run_finetune(config, overrides)
        if run_report is not None:
            run_report(result)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def _finetune_in_process(cfg: BenchPeftConfig, overrides: list[str],
                         run_report: Callable[[dict[str, Any]], Any] | None) -> tuple[int | None, str]:
    """Run :func:`_finetune_process` in a fresh (spawned) interpreter: nothing is inherited from this process or
    an earlier run.  Returns its exit status (None: killed after ``timeout_s``) and what it wrote to stderr."""
    threads = None
    if cfg.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # the runs side by side share the cores
        threads = max(1, (os.cpu_count() or 1) // cfg.jobs)
    fd, stderr_path = tempfile.mkstemp(prefix="lmforge-bench-", suffix=".err")
    os.close(fd)
    try:
        proc = multiprocessing.get_context("spawn").Process(
            target=_finetune_process, args=(cfg.finetune, overrides, stderr_path, threads, run_report))
        proc.start()
        proc.join(cfg.timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
            return None, ""
        return proc.exitcode, Path(stderr_path).read_text(encoding="utf-8", errors="replace")
    finally:
        os.unlink(stderr_path)


def _claim_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` an empty directory of the bench's, marked as such (``lmforge.json``, kind ``bench-run``)
    before its run starts.  One the bench made earlier (a run of another command, or one cut off) is removed whole:
    everything in it is that run's.  A non-empty one without the mark was not made by the bench and is refused."""
    present = entries(run_dir)
    if present:
        marker = read_marker(run_dir)
        if marker is None or marker.get("kind") != "bench-run":
            raise ConfigError(f"bench peft: '{run_dir}' holds files the bench did not write "
                              f"({describe(present, run_dir)}); move them away or choose another run_dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir, "bench-run", [])


def _one_run(cfg: BenchPeftConfig, method: str, seed: int, lr: float | None,
             run_report: Callable[[dict[str, Any]], Any] | None) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir) / "runs" / f"{method}-seed{seed}"
    overrides = [f"run_dir={run_dir}", f"seed={seed}", "resume=false", "measure_memory=true",
                 *([f"train.lr={lr}"] if lr is not None else []), *cfg.overrides, *METHOD_ARGS[method], *cfg.method_overrides.get(method, [])]
    args = ["-m", "lmforge", "finetune", cfg.finetune, *overrides]  # the same run from the command line
    stamp = run_dir / "bench-command.json"  # written last: its presence means the run finished
    command = json.dumps(args)
    reused = cfg.reuse and stamp.is_file() and stamp.read_text(encoding="utf-8") == command
    t0 = time.perf_counter()
    if not reused:
        _claim_run_dir(run_dir)  # the bench's own run from another command, or one cut off, is replaced
        status, stderr = _finetune_in_process(cfg, overrides, run_report)
        if status is None:
            raise LmforgeError(f"bench peft: the {method} run (seed {seed}) took longer than "
                               f"timeout_s={cfg.timeout_s}; raise timeout_s or lower max_steps in overrides")
        if status != 0:
            tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LmforgeError(f"bench peft: the {method} run (seed {seed}) failed: {tail}; its command: "
                               f"{' '.join(args)}")
        atomic_write_text(stamp, command)
    res = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    saved = res["delta"]["adapter_bytes"] if "delta" in res else _dir_bytes(run_dir / "model")
    # the lr the run trained at: the bench's, or the method's default the run resolved (an older run: the bench's)
    return {"method": method, "seed": seed, "lr": res.get("lr", lr), "wall_s": time.perf_counter() - t0, "reused": reused,
            "val_accuracy": res.get("validation", {}).get("accuracy"), "test_accuracy": res.get("test", {}).get("accuracy"),
            "trainable": res["trainable_params"], "total": res["total_params"], "memory": res.get("memory", {}),
            "s_per_step": _s_per_step(rows), "tokens_per_s": statistics.fmean(tps) if tps else None,
            "saved_bytes": saved, "steps_to_95": _steps_to_95(rows), "family": res["family"], "task": res["task"]}


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        tests = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
        mem = {k: _mean([r["memory"].get(k) for r in rs]) for k in ("parameters", "gradients", "optimizer",
                                                                     "activations", "total")}
        rows.append({"method": method, "lr": rs[0]["lr"], "seeds": len(rs), "trainable": rs[0]["trainable"],
                     "trainable_pct": 100.0 * rs[0]["trainable"] / max(1, rs[0]["total"]),
                     "val_accuracy": _mean([r["val_accuracy"] for r in rs]), "test_accuracy": _mean(tests),
                     "test_std": statistics.pstdev(tests) if len(tests) > 1 else 0.0, "memory": mem,
                     "s_per_step": _mean([r["s_per_step"] for r in rs]),
                     "tokens_per_s": _mean([r["tokens_per_s"] for r in rs]), "saved_bytes": rs[0]["saved_bytes"],
                     "steps_to_95": _mean([r["steps_to_95"] for r in rs])})
    return rows


def bench_peft(cfg: BenchPeftConfig, run_report: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Run every (method, seed) not already finished, ``jobs`` at a time, and return the table (also written to
    ``RUN_DIR/bench.json``).  ``run_report(result)`` runs in each run's process after it finishes (the CLI passes
    its fine-tuning report writer, so each run dir has the report ``lmforge finetune`` writes); it must be a
    module-level function (the spawned process imports it by name)."""
    if not cfg.methods or not cfg.seeds:
        raise ConfigError(f"methods={cfg.methods} and seeds={cfg.seeds} must each name at least one")
    unknown = [m for m in cfg.methods if m not in METHOD_ARGS]
    if unknown:
        raise ConfigError(f"methods: {unknown} are not benchmarkable methods; valid: {', '.join(METHOD_ARGS)}")
    stray = [m for m in cfg.method_overrides if m not in METHOD_ARGS]
    if stray:
        raise ConfigError(f"method_overrides: {stray[0]!r} is not a benchmarkable method; valid: "
                          f"{', '.join(METHOD_ARGS)}")
    if not Path(cfg.finetune).is_file():
        raise ConfigError(f"finetune='{cfg.finetune}' is not a file; point it at a fine-tuning config "
                          f"(e.g. configs/finetune-gpt2-sentiment.yaml)")
    if cfg.jobs < 1:
        raise ConfigError(f"jobs={cfg.jobs} must be >= 1")
    full_lr = float(cfg.lr.get("full", _finetune_lr(cfg)))
    todo = [(m, s, _method_lr(cfg, m, full_lr)) for m in cfg.methods for s in cfg.seeds]
    finished = itertools.count(1)  # next() on a count is atomic: worker threads number their lines without a lock

    def one(job: tuple[str, int, float | None]) -> dict[str, Any]:
        method, seed, lr = job
        run = _one_run(cfg, method, seed, lr, run_report)
        done = next(finished)
        how = "reused" if run["reused"] else f"{run['wall_s']:.0f} s"
        print(f"[{done}/{len(todo)}] {method}, seed {seed}, lr {run['lr']:g}: test accuracy {run['test_accuracy']} ({how})",
              file=sys.stderr, flush=True)
        return run

    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:  # threads only wait on the runs' processes
        runs = list(pool.map(one, todo))  # in table order, whatever order they finish in
    rows = summarise(runs)
    out = {"run_dir": cfg.run_dir, "family": runs[0]["family"], "task": runs[0]["task"], "summary": rows,
           "runs": runs, "config": to_dict(cfg)}
    atomic_write_json(Path(cfg.run_dir) / "bench.json", out)
    return out


def run_bench_peft(config_path: str | None, overrides: list[str],
                   run_report: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    cfg = load_config(BenchPeftConfig, *split_config_arg(config_path, overrides))
    return bench_peft(cfg, run_report)
