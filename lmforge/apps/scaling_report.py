"""The scaling study's report: ``report.md`` + ``isoflop.png`` (IsoFLOP curves, their parabolas and minima),
``loss_vs_nd.png`` (loss against N and against D with approach 3's surface) and ``frontier.png`` (compute-optimal N
and D against C, both approaches), from :func:`lmforge.recipes.scaling_fit.fit`'s result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmforge.apps.report import _pyplot, markdown_table
from lmforge.core.io import atomic_path, atomic_write_json, atomic_write_text
from lmforge.eval.scaling_laws import compute_optimal
from lmforge.recipes.scaling_fit import budgets_of, summary_lines


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _predict(p: dict[str, float], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def plot_isoflop(out: dict[str, Any], path: Path, plt: Any) -> None:
    pts = out["points"]
    budgets = budgets_of(pts)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    curves = {c["budget"]: c for c in out.get("approach2", {}).get("curves", [])}
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(set(budgets)))))
    for color, c in zip(colors, sorted(set(budgets))):
        n = np.array([p["N"] for p, b in zip(pts, budgets) if b == c])
        l_ = np.array([p["loss"] for p, b in zip(pts, budgets) if b == c])
        ax.scatter(n, l_, color=color, s=18, label=f"C = {c:.2g}")
        if c in curves:
            p2, p1, p0 = curves[c]["coeffs"]
            xs = np.linspace(np.log(n.min()) - 0.2, np.log(n.max()) + 0.2, 100)
            ax.plot(np.exp(xs), p2 * xs ** 2 + p1 * xs + p0, color=color, lw=1)
            ax.scatter([curves[c]["N_opt"]], [curves[c]["loss_opt"]], color=color, marker="*", s=120,
                       edgecolor="black", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("N (parameters)")
    ax.set_ylabel("final loss")
    ax.set_title("IsoFLOP curves (★: parabola minimum, approach 2)")
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def plot_loss_vs_nd(out: dict[str, Any], path: Path, plt: Any) -> None:
    pts = out["points"]
    n = np.array([p["N"] for p in pts])
    d = np.array([p["D"] for p in pts])
    loss = np.array([p["loss"] for p in pts])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, other, name in ((axes[0], n, d, "N (parameters)"), (axes[1], d, n, "D (tokens)")):
        sc = ax.scatter(x, loss, c=np.log10(other), s=14, cmap="viridis")
        fig.colorbar(sc, ax=ax, label=f"log10 {'D' if x is n else 'N'}")
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("final loss")
    if "approach3" in out:
        p = out["approach3"]["params"]
        for q in np.quantile(d, [0.1, 0.5, 0.9]):
            xs = np.geomspace(n.min(), n.max(), 100)
            axes[0].plot(xs, _predict(p, xs, np.full_like(xs, q)), lw=1, color="gray")
        for q in np.quantile(n, [0.1, 0.5, 0.9]):
            xs = np.geomspace(d.min(), d.max(), 100)
            axes[1].plot(xs, _predict(p, np.full_like(xs, q), xs), lw=1, color="gray")
        axes[0].set_title("loss vs N (lines: approach 3 at D's 10/50/90 %)", fontsize=9)
        axes[1].set_title("loss vs D (lines: approach 3 at N's 10/50/90 %)", fontsize=9)
    _save(fig, path)
    plt.close(fig)


def plot_frontier(out: dict[str, Any], path: Path, plt: Any) -> None:
    cs = np.array([p["C"] for p in out["points"]])
    grid = np.geomspace(cs.min(), max(cs.max(), out["budget"]), 50)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if "approach2" in out:
        a2 = out["approach2"]
        for key, mark, label in (("N_opt", "o", "N"), ("D_opt", "s", "D")):
            ax.scatter([c["budget"] for c in a2["curves"]], [c[key] for c in a2["curves"]], marker=mark,
                       color="C0" if label == "N" else "C1", label=f"{label}_opt per curve (approach 2)")
        ax.plot(grid, a2["N_coeff"] * grid ** a2["N_exponent"], color="C0", lw=1,
                label=f"approach 2: N ∝ C^{a2['N_exponent']:.2f}")
        ax.plot(grid, a2["D_coeff"] * grid ** a2["D_exponent"], color="C1", lw=1,
                label=f"approach 2: D ∝ C^{a2['D_exponent']:.2f}")
    if "approach3" in out:
        opt = [compute_optimal(out["approach3"]["params"], c) for c in grid]
        ax.plot(grid, [o["N_opt"] for o in opt], color="C0", ls="--", lw=1,
                label=f"approach 3: N ∝ C^{opt[0]['N_exponent']:.2f}")
        ax.plot(grid, [o["D_opt"] for o in opt], color="C1", ls="--", lw=1,
                label=f"approach 3: D ∝ C^{opt[0]['D_exponent']:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("C (training FLOPs)")
    ax.set_ylabel("compute-optimal N, D")
    ax.set_title("compute-optimal frontier")
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def write_scaling_report(out: dict[str, Any], out_dir: str | Path, title: str = "Scaling study") -> Path:
    """Write ``report.md``, ``fit.json`` and the three PNGs into ``out_dir``; returns the report's path."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "fit.json", out)
    plt = _pyplot()
    pngs = []
    if plt is not None:
        for name, fn in (("isoflop.png", plot_isoflop), ("loss_vs_nd.png", plot_loss_vs_nd),
                         ("frontier.png", plot_frontier)):
            if name == "isoflop.png" and "approach2" not in out:
                continue
            fn(out, out_dir / name, plt)
            pngs.append(name)
    lines = [f"# {title}", "", *[f"- {s}" for s in summary_lines(out)], ""]
    if "approach2" in out:
        lines += ["## Approach 2: IsoFLOP parabolas", "",
                  markdown_table([{"budget C": c["budget"], "sizes": c["points"], "N_opt": c["N_opt"],
                                   "D_opt": c["D_opt"], "D/N": c["D_opt"] / c["N_opt"], "loss at min": c["loss_opt"]}
                                  for c in out["approach2"]["curves"]]), ""]
    if "approach3" in out:
        a3 = out["approach3"]
        rows = [{"parameter": k, "value": v, **({"95% low": a3["intervals"][k][0], "95% high": a3["intervals"][k][1]}
                                               if k in a3["intervals"] else {})} for k, v in a3["params"].items()]
        lines += ["## Approach 3: L = E + A/N^α + B/D^β", "",
                  f"Huber (δ = 1e-3) on log loss, L-BFGS from {a3['starts']} starts ({a3['converged_starts']} "
                  f"converged), best objective {a3['objective']:.6g}"
                  + (f"; intervals from {a3['bootstrap']} bootstrap resamples" if a3["bootstrap"] else "") + ".", "",
                  markdown_table(rows), ""]
    pts = out["points"]
    cols = [c for c in ("budget", "name", "N", "D", "C", "loss", "n_params") if c in pts[0]]
    lines += ["## Points", "", markdown_table([{c: p.get(c) for c in cols} for p in pts]), ""]
    lines += [f"![{p}]({p})" for p in pngs] or ["(plots need matplotlib: pip install -e \".[plots]\")"]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
