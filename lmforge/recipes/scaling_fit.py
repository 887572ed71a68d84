"""`lmforge scaling fit DATA`: Chinchilla approaches 2 and 3 on a sweep's points or a plain CSV.

DATA is a scaling sweep's run dir (its ``points.csv``, written by :mod:`lmforge.recipes.scaling_sweep`) or a CSV file
with a column for N, one for D or C (D = C / (6 N) when only C is given), and the loss; a ``budget`` column groups
points into IsoFLOP curves for approach 2 (without one, points whose C agree within 10 % form a curve).  The math is
:mod:`lmforge.eval.scaling_laws`; this module reads, checks (every bad input one line naming the file and the fix)
and assembles the result the CLI prints and the report (:mod:`lmforge.apps.scaling_report`) draws.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.core.errors import ConfigError, DataError
from lmforge.eval.scaling_laws import (K_FLOPS, PARAMS, approach2_optimal, as_dict, compute_optimal, epoch_grid,
                                       fit_approach2, fit_approach3, small_grid)

# accepted column names (case-insensitive) -> the quantity
COLUMNS = {
    "N": ("n", "params", "parameters", "model size", "model_size", "n_params"),
    "D": ("d", "tokens", "training tokens", "training_tokens"),
    "C": ("c", "flops", "training flop", "training_flop", "compute"),
    "loss": ("loss", "val_loss", "final_loss"),
    "budget": ("budget",),
}


@dataclass
class FitOptions:
    approach: Literal["2", "3", "both"] = "both"
    drop_highest: int = 0
    """Leave out the K highest-loss points (Besiroglu et al. drop 5 of Chinchilla's as outliers)."""
    grid: Literal["full", "small"] = "full"
    """approach 3's starts: the 4,500-point grid or a 72-point one."""
    bootstrap: int = 0
    """Bootstrap resamples for approach 3's 95 % intervals (0: none)."""
    budget: float | None = None
    """Compute budget (FLOPs) for the compute-optimal N and D (default: the largest C in the data)."""
    seed: int = 0


def _column(header: list[str], quantity: str) -> str | None:
    names = {h.strip().lower(): h for h in header}
    return next((names[a] for a in COLUMNS[quantity] if a in names), None)


def read_points(source: str | Path) -> tuple[list[dict[str, float]], str]:
    """Points ``{N, D, C, loss[, budget]}`` from a sweep run dir or a CSV, and the file read."""
    path = Path(source)
    if path.is_dir():
        path = path / "points.csv"
        if not path.is_file():
            raise DataError(f"'{source}' is a directory without points.csv; point `scaling fit` at a scaling sweep's "
                            f"run dir or at a CSV file")
    if not path.is_file():
        raise DataError(f"'{source}' is neither a CSV file nor a scaling sweep's run dir")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        cols = {q: _column(header, q) for q in COLUMNS}
        missing = [q for q in ("N", "loss") if cols[q] is None]
        if cols["D"] is None and cols["C"] is None:
            missing.append("D or C")
        if missing:
            raise DataError(f"{path}:1: the CSV lacks column(s) {', '.join(missing)} (its columns: "
                            f"{', '.join(header) or 'none'}); name them N (or 'Model Size'), D (tokens) or C (FLOPs), "
                            f"and loss")
        points = []
        for line, row in enumerate(reader, start=2):
            try:
                p = {q: float(row[c]) for q, c in cols.items() if c is not None and row.get(c) not in (None, "")}
            except ValueError as e:
                raise DataError(f"{path}:{line}: {e}; every N, D, C and loss must be a number") from None
            if any(not (p.get(q, 1.0) > 0 and math.isfinite(p.get(q, 1.0))) for q in ("N", "D", "C", "loss")):
                raise DataError(f"{path}:{line}: N, D, C and loss must be positive finite numbers, got {row}")
            if "D" not in p:
                p["D"] = p["C"] / (K_FLOPS * p["N"])
            p.setdefault("C", K_FLOPS * p["N"] * p["D"])
            points.append(p)
    return points, str(path)


def budgets_of(points: list[dict[str, float]]) -> list[float]:
    """Each point's IsoFLOP budget: its ``budget`` column, else the first C of a run of Cs within 10 % of it."""
    if all("budget" in p for p in points):
        return [p["budget"] for p in points]
    order = sorted(range(len(points)), key=lambda i: points[i]["C"])
    out = [0.0] * len(points)
    anchor = None
    for i in order:
        c = points[i]["C"]
        if anchor is None or c > anchor * 1.1:
            anchor = c
        out[i] = anchor
    return out


def fit(source: str | Path, opts: FitOptions) -> dict[str, Any]:
    points, path = read_points(source)
    if opts.drop_highest < 0:
        raise ConfigError(f"--drop-highest {opts.drop_highest} must be >= 0")
    if opts.drop_highest:
        points = sorted(points, key=lambda p: p["loss"])[:max(0, len(points) - opts.drop_highest)]
    if len(points) < len(PARAMS):
        raise DataError(f"{path}: {len(points)} points (after dropping {opts.drop_highest}) is fewer than the "
                        f"{len(PARAMS)} parameters approach 3 fits; give it at least {len(PARAMS)} points")
    budget = opts.budget or max(p["C"] for p in points)
    out: dict[str, Any] = {"source": path, "points": points, "budget": budget,
                           "convention": f"C = {K_FLOPS:g}·N·D for the compute-optimal split (Kaplan et al. 2020)"}
    if opts.approach in ("2", "both"):
        try:
            a2 = fit_approach2(budgets_of(points), [p["N"] for p in points], [p["D"] for p in points],
                               [p["loss"] for p in points])
            out["approach2"] = {**as_dict(a2), "optimal": approach2_optimal(a2, budget)}
        except DataError as e:
            if opts.approach == "2":
                raise
            out["approach2_error"] = str(e)  # both asked for: approach 3 still runs, the report says why not 2
    if opts.approach in ("3", "both"):
        a3 = fit_approach3([p["N"] for p in points], [p["D"] for p in points], [p["loss"] for p in points],
                           grid=epoch_grid() if opts.grid == "full" else small_grid(), bootstrap=opts.bootstrap,
                           seed=opts.seed, budget=budget)
        out["approach3"] = {**as_dict(a3), "optimal": compute_optimal(a3.params, budget)}
    return out


def summary_lines(out: dict[str, Any]) -> list[str]:
    """What the CLI prints: the fits, the exponents and the compute-optimal split at the budget."""
    lines = [f"{len(out['points'])} points from {out['source']}; compute-optimal figures at C = {out['budget']:.3g} "
             f"FLOPs ({out['convention']})"]
    if "approach2" in out:
        a2, o = out["approach2"], out["approach2"]["optimal"]
        lines.append(f"approach 2 ({len(a2['curves'])} IsoFLOP curves): N_opt ∝ C^{a2['N_exponent']:.3f}, "
                     f"D_opt ∝ C^{a2['D_exponent']:.3f}; N_opt = {o['N_opt']:.4g}, D_opt = {o['D_opt']:.4g}, "
                     f"{o['tokens_per_param']:.1f} tokens per parameter")
    if "approach2_error" in out:
        lines.append(f"approach 2: not fitted: {out['approach2_error']}")
    if "approach3" in out:
        a3, o = out["approach3"], out["approach3"]["optimal"]
        p = a3["params"]
        iv = a3["intervals"]
        ci = (lambda k: f" [{iv[k][0]:.4g}, {iv[k][1]:.4g}]" if k in iv else "")  # noqa: E731
        lines.append(f"approach 3 ({a3['starts']} starts, {a3['seconds']:.1f} s): E = {p['E']:.4f}{ci('E')}, "
                     f"A = {p['A']:.4g}{ci('A')}, B = {p['B']:.4g}{ci('B')}, alpha = {p['alpha']:.4f}{ci('alpha')}, "
                     f"beta = {p['beta']:.4f}{ci('beta')}")
        lines.append(f"approach 3: N_opt ∝ C^{o['N_exponent']:.3f}, D_opt ∝ C^{o['D_exponent']:.3f}; N_opt = "
                     f"{o['N_opt']:.4g}, D_opt = {o['D_opt']:.4g}, {o['tokens_per_param']:.1f}"
                     f"{ci('tokens_per_param')} tokens per parameter")
    return lines
