"""A batched L-BFGS: many independent minimisations (one per row) advanced together with tensor operations.

A scaling-law fit runs L-BFGS from thousands of starting points (Hoffmann et al. 2022 §D.2; Besiroglu et al. 2024
use a 4,500-point grid).  Looping scipy's optimizer over them costs minutes; here every start is one row of an
``[S, P]`` tensor and each iteration is a handful of ``[S, P]`` operations, so the whole grid costs about what one
start costs in Python.

The algorithm is Nocedal & Wright, "Numerical Optimization" (2nd ed.), Algorithm 7.4 (the two-loop recursion over
the last ``m`` curvature pairs, initial Hessian ``γ I`` with ``γ = sᵀy / yᵀy``, eq. 7.20), with a backtracking
Armijo line search (Algorithm 3.1, ``c1 = 1e-4``) per row.  A pair with ``sᵀy ≤ 0`` is not stored (the update would
not stay positive definite); a direction that is not a descent direction falls back to steepest descent.  A row
stops when its gradient's max-norm is below ``gtol``, when its loss changed by less than ``ftol`` (relative) over
an iteration, or when its line search finds no decrease.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(x [R, P], rows [R]) -> (f [R], grad [R, P])``: the loss and analytic gradient of the problems ``rows`` (indices
into the batch: a row's own data, e.g. its bootstrap weights) at ``x``."""


@dataclass
class LbfgsResult:
    x: torch.Tensor
    """[S, P] the rows' final points."""
    f: torch.Tensor
    """[S] their losses."""
    converged: torch.Tensor
    """[S] bool: stopped by a tolerance (not by ``max_iter``)."""
    iterations: int
    evaluations: int


def batched_lbfgs(objective: Objective, x0: torch.Tensor, max_iter: int = 15000, history: int = 10,
                  gtol: float = 1e-5, ftol: float = 2.220446049250313e-09, max_backtracks: int = 30) -> LbfgsResult:
    """Minimise ``objective`` from every row of ``x0`` at once (see the module docstring).

    The stopping rules and defaults are scipy's L-BFGS-B ones (``pgtol = 1e-5`` on the gradient's max-norm;
    ``(f_k − f_k+1) / max(|f_k|, |f_k+1|, 1) ≤ factr·eps = 2.2e-9``, ``maxiter = 15000``, ``m = 10``), so a fit
    stops where scipy's would.  Rows that stop leave the working set: later iterations cost only what is left."""
    S, P = x0.shape
    out_x, out_f = x0.clone(), torch.full((S,), torch.inf, dtype=x0.dtype, device=x0.device)
    out_conv = torch.zeros(S, dtype=torch.bool, device=x0.device)
    rows = torch.arange(S, device=x0.device)
    x = x0.clone()
    f, g = objective(x, rows)
    evals = 1
    ok0 = torch.isfinite(f) & torch.isfinite(g).all(dim=1)
    out_f[~ok0] = torch.nan
    rows, x, f, g = rows[ok0], x[ok0], f[ok0], g[ok0]
    s_hist = x.new_zeros(history, len(rows), P)
    y_hist = x.new_zeros(history, len(rows), P)
    rho = x.new_zeros(history, len(rows))  # 0 marks an empty (or refused) slot: it then contributes nothing
    gamma = x.new_ones(len(rows))
    it = 0
    for it in range(1, max_iter + 1):
        if len(rows) == 0:
            break
        R = len(rows)
        # two-loop recursion, newest pair first (slot k % history holds pair k)
        q = g.clone()
        alphas = []
        order = [(it - 2 - j) % history for j in range(min(it - 1, history))]
        for k in order:
            a = rho[k] * (s_hist[k] * q).sum(dim=1)
            q = q - a[:, None] * y_hist[k]
            alphas.append(a)
        r = gamma[:, None] * q
        for k, a in zip(reversed(order), reversed(alphas)):
            b = rho[k] * (y_hist[k] * r).sum(dim=1)
            r = r + (a - b)[:, None] * s_hist[k]
        d = -r
        slope = (g * d).sum(dim=1)
        bad = ~(slope < 0) | ~torch.isfinite(slope)
        if bool(bad.any()):  # not a descent direction: steepest descent for those rows
            d = torch.where(bad[:, None], -g, d)
            slope = torch.where(bad, -(g * g).sum(dim=1), slope)
        # first iteration: a unit step along -g may be huge; scale it to a unit-length move
        t = x.new_ones(R) if it > 1 else 1.0 / g.norm(dim=1).clamp_min(1e-12)
        # backtracking Armijo line search: each round evaluates only the rows still without an accepted step
        x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
        accepted = torch.zeros(R, dtype=torch.bool, device=x.device)
        pending = torch.arange(R, device=x.device)
        for _ in range(max_backtracks):
            trial = x[pending] + t[pending, None] * d[pending]
            ft, gt = objective(trial, rows[pending])
            evals += 1
            ok = torch.isfinite(ft) & (ft <= f[pending] + 1e-4 * t[pending] * slope[pending]) & \
                torch.isfinite(gt).all(dim=1)
            hit = pending[ok]
            x_new[hit], f_new[hit], g_new[hit] = trial[ok], ft[ok], gt[ok]
            accepted[hit] = True
            pending = pending[~ok]
            if len(pending) == 0:
                break
            t[pending] = t[pending] * 0.5
        s = x_new - x
        y = g_new - g
        sy = (s * y).sum(dim=1)
        slot = (it - 1) % history
        keep = accepted & (sy > 1e-20)
        s_hist[slot] = torch.where(keep[:, None], s, 0.0)
        y_hist[slot] = torch.where(keep[:, None], y, 0.0)
        rho[slot] = torch.where(keep, 1.0 / torch.where(keep, sy, 1.0), 0.0)
        gamma = torch.where(keep, sy / (y * y).sum(dim=1).clamp_min(1e-300), gamma)
        rel = (f - f_new) / torch.maximum(torch.maximum(f.abs(), f_new.abs()), torch.ones_like(f))
        x, f, g = x_new, f_new, g_new
        done = ~accepted | (g.abs().amax(dim=1) <= gtol) | (rel <= ftol)  # no decrease found, or a tolerance met
        if bool(done.any()):
            fin = rows[done]
            out_x[fin], out_f[fin], out_conv[fin] = x[done], f[done], True
            live = ~done
            rows, x, f, g, gamma = rows[live], x[live], f[live], g[live], gamma[live]
            s_hist, y_hist, rho = s_hist[:, live], y_hist[:, live], rho[:, live]
    out_x[rows], out_f[rows] = x, f  # rows still going at max_iter
    return LbfgsResult(out_x, out_f, out_conv, it, evals)
