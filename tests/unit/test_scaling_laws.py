"""Scaling-law fits: the batched L-BFGS, approach 3's analytic gradient and its recovery of Epoch AI's fit on their
Chinchilla points, approach 2 on a known surface, and the one-line errors of `lmforge scaling fit`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmforge.core.errors import DataError
from lmforge.eval.lbfgs import batched_lbfgs
from lmforge.eval.scaling_laws import (compute_optimal, epoch_grid, fit_approach2, fit_approach3, huber_objective,
                                       small_grid)
from lmforge.recipes.scaling_fit import FitOptions, fit, read_points

CHINCHILLA = Path(__file__).parent.parent / "data" / "chinchilla_figure4_points.csv"
# Besiroglu et al. 2024, Table 1 (and the replication's notebook): E = exp(0.5971), alpha, beta
EPOCH = {"E": 1.8172, "alpha": 0.3478, "beta": 0.3658}


def test_batched_lbfgs_minimises_every_row_independently():
    torch.manual_seed(0)
    centers = torch.randn(50, 4, dtype=torch.float64)
    scales = torch.rand(50, 4, dtype=torch.float64) * 10 + 0.1  # ill-conditioned per row

    def objective(x, rows):
        z = x - centers[rows]
        return (scales[rows] * z * z).sum(1) + (z ** 4).sum(1), 2 * scales[rows] * z + 4 * z ** 3

    res = batched_lbfgs(objective, torch.zeros(50, 4, dtype=torch.float64), gtol=1e-10, ftol=0.0)
    assert bool(res.converged.all())
    assert torch.allclose(res.x, centers, atol=1e-6)


def test_approach3_gradient_is_the_derivative_of_the_objective():
    torch.manual_seed(0)
    log_n = torch.rand(30, dtype=torch.float64) * 5 + 15
    log_d = torch.rand(30, dtype=torch.float64) * 5 + 20
    log_l = torch.rand(30, dtype=torch.float64) * 0.5 + 0.7
    weights = torch.randint(0, 3, (8, 30)).double()
    theta = (small_grid()[:8] + torch.rand(8, 5, dtype=torch.float64)).requires_grad_(True)
    f, g = huber_objective(log_n, log_d, log_l, weights, delta=0.05)(theta.detach(), torch.arange(8))
    # reference: autograd through the same formula written plainly
    a, b, e, al, be = theta.unbind(1)
    pred = torch.logsumexp(torch.stack([a[:, None] - al[:, None] * log_n, b[:, None] - be[:, None] * log_d,
                                        e[:, None].expand(-1, 30)]), 0)
    ref = (torch.nn.functional.huber_loss(pred, log_l.expand(8, -1), delta=0.05, reduction="none") * weights).sum(1)
    ref.sum().backward()
    assert torch.allclose(f, ref.detach(), rtol=1e-10)
    assert torch.allclose(g, theta.grad, rtol=1e-8, atol=1e-12)


def test_epoch_grid_is_their_4500_starts():
    grid = epoch_grid()
    assert grid.shape == (4500, 5)
    assert sorted(set(grid[:, 3].tolist())) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert sorted(set(grid[:, 0].tolist())) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]


def test_approach3_recovers_epochs_fit_on_the_chinchilla_points():
    out = fit(CHINCHILLA, FitOptions(approach="3", drop_highest=5, grid="small", budget=5.76e23))
    assert len(out["points"]) == 240
    p = out["approach3"]["params"]
    assert abs(p["E"] - EPOCH["E"]) < 0.01
    assert abs(p["alpha"] - EPOCH["alpha"]) < 0.005
    assert abs(p["beta"] - EPOCH["beta"]) < 0.005
    # the compute-optimal split it implies: about 20 tokens per parameter (Besiroglu et al.)
    assert 15 < out["approach3"]["optimal"]["tokens_per_param"] < 30


def test_compute_optimal_is_the_constrained_minimum():
    p = {"E": 1.8, "A": 480.0, "B": 2100.0, "alpha": 0.35, "beta": 0.37}
    C = 1e21
    opt = compute_optimal(p, C)
    assert math.isclose(6 * opt["N_opt"] * opt["D_opt"], C, rel_tol=1e-9)

    def loss_at(n):
        return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / (C / 6 / n) ** p["beta"]

    for f in (0.9, 1.1):  # moving along C = 6ND either way costs loss
        assert loss_at(opt["N_opt"] * f) > loss_at(opt["N_opt"])


def test_approach2_recovers_the_exponent_of_a_known_surface():
    p = {"E": 1.5, "A": 400.0, "B": 400.0, "alpha": 0.3, "beta": 0.3}  # equal exponents: N_opt ∝ C^0.5
    budgets, ns, ds, losses = [], [], [], []
    for C in (1e18, 1e19, 1e20, 1e21):
        n_opt = compute_optimal(p, C)["N_opt"]
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            n = n_opt * f
            d = C / (6 * n)
            budgets.append(C), ns.append(n), ds.append(d)
            losses.append(p["E"] + p["A"] / n ** 0.3 + p["B"] / d ** 0.3)
    a2 = fit_approach2(budgets, ns, ds, losses)
    assert abs(a2.N_exponent - 0.5) < 0.01 and abs(a2.D_exponent - 0.5) < 0.01
    for curve in a2.curves:  # the vertex lands on the true optimum (a symmetric grid in log N)
        assert abs(math.log(curve.N_opt / compute_optimal(p, curve.budget)["N_opt"])) < 0.05


def _csv(tmp_path, text):
    path = tmp_path / "points.csv"
    path.write_text(text)
    return path


def test_csv_without_the_needed_columns_is_one_line(tmp_path):
    path = _csv(tmp_path, "params,flops\n1,2\n")
    with pytest.raises(DataError, match=r"points.csv:1: the CSV lacks column\(s\) loss") as e:
        read_points(path)
    assert "\n" not in str(e.value)


def test_fewer_points_than_parameters_is_one_line(tmp_path):
    path = _csv(tmp_path, "N,D,loss\n1e6,1e8,3.0\n2e6,1e8,2.9\n4e6,1e8,2.8\n")
    with pytest.raises(DataError, match="3 points .* fewer than the 5 parameters"):
        fit(path, FitOptions(approach="3"))


def test_one_size_per_budget_is_one_line_for_approach_2(tmp_path):
    rows = "".join(f"{n},{c},{l}\n" for n, c, l in [(1e6, 1e15, 3.0), (2e6, 1e16, 2.9), (4e6, 1e17, 2.8),
                                                    (8e6, 1e18, 2.7), (1.6e7, 1e19, 2.6), (3.2e7, 1e20, 2.5)])
    path = _csv(tmp_path, "N,C,loss\n" + rows)
    with pytest.raises(DataError, match="1 model size.*needs three or more sizes per budget"):
        fit(path, FitOptions(approach="2"))


def test_bad_numbers_name_the_line(tmp_path):
    path = _csv(tmp_path, "N,D,loss\n1e6,1e8,3.0\n2e6,x,2.9\n")
    with pytest.raises(DataError, match=r"points.csv:3:"):
        read_points(path)
