"""Chinchilla scaling-law fits: approach 2 (IsoFLOP parabolas) and approach 3 (the parametric loss), and the
compute-optimal model size and token count they imply.  Hoffmann et al. 2022, "Training Compute-Optimal Large
Language Models" (§3.2, §3.3, App. D.2); Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt".

Approach 3 fits ``L(N, D) = E + A/N^α + B/D^β`` as both papers did: in log space, with ``a = log A``, ``b = log B``,
``e = log E``, the prediction is ``log L̂ = LSE(a − α log N, b − β log D, e)`` (LSE: log-sum-exp) and the objective is
the Huber loss (δ = 1e-3) of ``log L̂ − log L`` summed over the points, minimised by L-BFGS from a grid of starts
(Besiroglu et al.: α, β ∈ {0, .5, …, 2}, e ∈ {−1, −.5, …, 1}, a, b ∈ {0, 5, …, 25}: 4,500 starts), the lowest final
objective kept.  The gradient is analytic: with ``w`` the softmax weights of the three LSE terms and ``h = clamp(r,
−δ, δ)`` Huber's derivative at residual ``r``, ``∂/∂(a, b, e, α, β) = Σ h·(w₁, w₂, w₃, −w₁ log N, −w₂ log D)``.  All
starts run as one batch (:func:`lmforge.eval.lbfgs.batched_lbfgs`, float64); bootstrap refits are one more batch,
each row with its own resampling weights.

Compute-optimal allocation under ``C = k·N·D`` (k = 6, Kaplan et al. 2020): minimising ``L`` along the constraint
gives (Hoffmann et al. eq. 4) ``N_opt = G (C/k)^(β/(α+β))``, ``D_opt = G⁻¹ (C/k)^(α/(α+β))``,
``G = (αA / (βB))^(1/(α+β))``.

Approach 2 fits, for each budget, a parabola ``L = p₂ x² + p₁ x + p₀`` in ``x = ln N``; its vertex is ``N_opt(C)``
and ``D_opt(C)`` is read off the same curve (``ln D`` interpolated in ``ln N``: on an IsoFLOP curve D follows from N).
Least squares of ``ln N_opt`` and ``ln D_opt`` on ``ln C`` give the power laws ``N_opt ∝ C^a``, ``D_opt ∝ C^b``.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from lmforge.core.errors import DataError
from lmforge.eval.lbfgs import batched_lbfgs

HUBER_DELTA = 1e-3
PARAMS = ("E", "A", "B", "alpha", "beta")
K_FLOPS = 6.0
"""C = K_FLOPS · N · D: the convention the compute-optimal formulas use."""


def epoch_grid() -> torch.Tensor:
    """Besiroglu et al.'s 4,500 starting points as rows ``(a, b, e, α, β)``."""
    exps = [0.0, 0.5, 1.0, 1.5, 2.0]
    es = [-1.0, -0.5, 0.0, 0.5, 1.0]
    abs_ = [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    rows = [(a, b, e, al, be) for al, be, e, a, b in itertools.product(exps, exps, es, abs_, abs_)]
    return torch.tensor(rows, dtype=torch.float64)


def small_grid() -> torch.Tensor:
    """72 starts from the same ranges (α, β ∈ {0.5, 1}, e ∈ {−1, 0, 1}, a ∈ {5, 15}, b ∈ {5, 15, 25}): for tests and
    quick looks."""
    rows = [(a, b, e, al, be) for al, be, e, a, b in itertools.product([0.5, 1.0], [0.5, 1.0], [-1.0, 0.0, 1.0],
                                                                          [5.0, 15.0], [5.0, 15.0, 25.0])]
    return torch.tensor(rows, dtype=torch.float64)


def huber_objective(log_n: torch.Tensor, log_d: torch.Tensor, log_loss: torch.Tensor,
                    weights: torch.Tensor | None = None, delta: float = HUBER_DELTA):
    """``(theta [R, 5] (a, b, e, α, β), rows [R]) -> (Σ_i w_i Huber_δ(log L̂_i − log L_i) [R], analytic gradient
    [R, 5])``; ``weights`` [S, P] per problem (its bootstrap counts), or None (all ones)."""

    def objective(theta: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, e, al, be = (v[:, None] for v in theta.unbind(dim=1))
        t1, t2 = a - al * log_n, b - be * log_d  # [R, P]: the log of A/N^α and of B/D^β
        m = torch.maximum(torch.maximum(t1, t2), e)  # log-sum-exp, stabilised by the largest term
        e1, e2, e3 = torch.exp(t1 - m), torch.exp(t2 - m), torch.exp(e - m)
        total = e1 + e2 + e3
        r = m + torch.log(total) - log_loss
        absr = r.abs()
        hub = torch.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))
        h = r.clamp(-delta, delta) / total  # Huber's derivative times 1/Σ: the softmax weights are e_i / Σ
        if weights is not None:
            w_rows = weights[rows]
            hub, h = hub * w_rows, h * w_rows
        hw1, hw2 = h * e1, h * e2
        grad = torch.stack([hw1.sum(1), hw2.sum(1), (h * e3).sum(1), -(hw1 * log_n).sum(1),
                            -(hw2 * log_d).sum(1)], dim=1)
        return hub.sum(dim=1), grad

    return objective


def to_params(theta: Sequence[float]) -> dict[str, float]:
    a, b, e, al, be = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": al, "beta": be}


def compute_optimal(params: dict[str, float], budget: float, k: float = K_FLOPS) -> dict[str, float]:
    """N_opt, D_opt, their ratio and the predicted loss at ``budget`` FLOPs (Hoffmann et al. eq. 4)."""
    A, B, al, be = params["A"], params["B"], params["alpha"], params["beta"]
    G = (al * A / (be * B)) ** (1.0 / (al + be))
    n = G * (budget / k) ** (be / (al + be))
    d = (budget / k) / n
    return {"budget": budget, "N_opt": n, "D_opt": d, "tokens_per_param": d / n,
            "loss": params["E"] + A / n ** al + B / d ** be, "N_exponent": be / (al + be),
            "D_exponent": al / (al + be)}


@dataclass
class Approach3:
    params: dict[str, float]
    objective: float
    starts: int
    converged_starts: int
    iterations: int
    seconds: float
    points: int
    intervals: dict[str, list[float]] = field(default_factory=dict)
    """Bootstrap percentile intervals (2.5 %, 97.5 %) per parameter and derived figure."""
    bootstrap: int = 0


def fit_approach3(n: Sequence[float], d: Sequence[float], loss: Sequence[float], grid: torch.Tensor | None = None,
                  bootstrap: int = 0, seed: int = 0, budget: float | None = None, max_iter: int = 15000
                  ) -> Approach3:
    """Fit ``L = E + A/N^α + B/D^β`` (see the module docstring); ``bootstrap`` resamples of the points (with
    replacement) are refitted from the best fit and give 95 % percentile intervals (of the parameters and, at
    ``budget``, of the compute-optimal figures)."""
    t0 = time.perf_counter()
    n_t, d_t, l_t = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (n, d, loss))
    if len(n_t) < len(PARAMS):
        raise DataError(f"approach 3 fits {len(PARAMS)} parameters (E, A, B, alpha, beta) but got {len(n_t)} points; "
                        f"give it at least {len(PARAMS)} (N, D, loss) points")
    log_n, log_d, log_l = n_t.log(), d_t.log(), l_t.log()
    starts = epoch_grid() if grid is None else grid.to(torch.float64)
    res = batched_lbfgs(huber_objective(log_n, log_d, log_l), starts, max_iter=max_iter)
    best = int(torch.nan_to_num(res.f, nan=torch.inf).argmin())
    theta = res.x[best]
    out = Approach3(to_params(theta), float(res.f[best]), len(starts), int(res.converged.sum()), res.iterations,
                    0.0, len(n_t))
    if bootstrap > 0:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, len(n_t), (bootstrap, len(n_t)), generator=gen)
        weights = torch.zeros(bootstrap, len(n_t), dtype=torch.float64).scatter_add_(
            1, idx, torch.ones_like(idx, dtype=torch.float64))
        # tolerances tighter than scipy's: A and B are weakly identified (a flat valley), and a refit that stops
        # where scipy's would barely leaves the full fit's point, which would make their intervals look far too narrow
        boot = batched_lbfgs(huber_objective(log_n, log_d, log_l, weights), theta.expand(bootstrap, -1).clone(),
                             max_iter=min(max_iter, 3000), gtol=1e-12, ftol=0.0)
        samples = [to_params(row) for row in boot.x.tolist()]
        if budget is not None:
            for s in samples:
                s.update({k: v for k, v in compute_optimal(s, budget).items() if k != "budget"})
        out.intervals = {k: [float(np.percentile([s[k] for s in samples], q)) for q in (2.5, 97.5)]
                         for k in samples[0]}
        out.bootstrap = bootstrap
    out.seconds = time.perf_counter() - t0
    return out


@dataclass
class IsoFlopCurve:
    budget: float
    coeffs: list[float]
    """Parabola ``p₂, p₁, p₀`` of loss in ln N."""
    N_opt: float
    D_opt: float
    loss_opt: float
    points: int


@dataclass
class Approach2:
    curves: list[IsoFlopCurve]
    N_exponent: float
    D_exponent: float
    N_coeff: float
    """``N_opt = N_coeff · C^N_exponent``."""
    D_coeff: float


def fit_approach2(budget: Sequence[float], n: Sequence[float], d: Sequence[float], loss: Sequence[float]
                  ) -> Approach2:
    """One parabola per budget (at least three sizes each), then the power laws over budgets (at least two)."""
    rows = sorted(zip(budget, n, d, loss))
    curves = []
    for c, group in itertools.groupby(rows, key=lambda r: r[0]):
        g = list(group)
        if len({r[1] for r in g}) < 3:
            raise DataError(f"approach 2: the budget {c:.3g} FLOPs has {len({r[1] for r in g})} model size(s); a "
                            f"parabola per IsoFLOP curve needs three or more sizes per budget (or use --approach 3)")
        x = np.log([r[1] for r in g])
        y = np.array([r[3] for r in g])
        p2, p1, p0 = np.polyfit(x, y, 2)
        if not p2 > 0:
            raise DataError(f"approach 2: the IsoFLOP curve at {c:.3g} FLOPs is not convex (no minimum in ln N); "
                            f"its sizes do not bracket the optimum: add smaller and larger models")
        xv = -p1 / (2 * p2)
        order = np.argsort(x)
        log_d = np.interp(xv, x[order], np.log([r[2] for r in g])[order],
                          left=None, right=None)
        if not x.min() <= xv <= x.max():  # outside the sizes: extrapolate D along C = const (D ∝ 1/N)
            log_d = math.log(c / (K_FLOPS * math.exp(xv)))
        curves.append(IsoFlopCurve(float(c), [float(p2), float(p1), float(p0)], float(math.exp(xv)),
                                   float(math.exp(log_d)), float(p0 + p1 * xv + p2 * xv * xv), len(g)))
    if len(curves) < 2:
        raise DataError(f"approach 2: {len(curves)} budget(s); the power laws N_opt(C), D_opt(C) need two or more "
                        f"budgets")
    lc = np.log([cv.budget for cv in curves])
    an, bn = np.polyfit(lc, np.log([cv.N_opt for cv in curves]), 1)
    ad, bd = np.polyfit(lc, np.log([cv.D_opt for cv in curves]), 1)
    return Approach2(curves, float(an), float(ad), float(math.exp(bn)), float(math.exp(bd)))


def approach2_optimal(fit: Approach2, budget: float) -> dict[str, float]:
    n = fit.N_coeff * budget ** fit.N_exponent
    d = fit.D_coeff * budget ** fit.D_exponent
    return {"budget": budget, "N_opt": n, "D_opt": d, "tokens_per_param": d / n}


def as_dict(obj: Any) -> Any:
    """Plain JSON-able form of the fit dataclasses."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: as_dict(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, list):
        return [as_dict(v) for v in obj]
    return obj
