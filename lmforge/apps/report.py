"""The run report: ``RUN_DIR/report.md`` plus PNG curves, written from what the run left on disk.

A report is built from sections (title + markdown body) that pipeline stages contribute in order; the
curves come from ``metrics.jsonl``.  matplotlib is optional: without it the report says how to get the
plots instead of failing the run.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.core.io import atomic_path, atomic_write_json, atomic_write_text


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib  # optional: pip install -e ".[plots]"
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: pip install -e ".[plots]"

    return plt


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


VAL_PERPLEXITY = "validation perplexity"


def curve_series(metrics: list[dict[str, Any]], right: str = VAL_PERPLEXITY) -> dict[str, list[list[float]]]:
    """The ``[step, value]`` points :func:`plot_curves` draws: every logged training loss (records of eval steps
    carry it too), every validation loss, and the right panel's metric (``right``: a metrics key such as
    ``val_accuracy``, or validation perplexity from ``val_loss``)."""
    def points(key: str) -> list[list[float]]:
        return [[m["step"], m[key]] for m in metrics if "step" in m and _number(m.get(key))]

    val = points("val_loss")
    panel = [[s, math.exp(min(v, 50))] for s, v in val] if right == VAL_PERPLEXITY else points(right)
    return {"train loss": points("loss"), "validation loss": val, right: panel}


def plot_curves(metrics: list[dict[str, Any]], out_png: str | Path, title: str = "", right: str = VAL_PERPLEXITY,
                references: dict[str, float] | None = None) -> bool:
    """Training and validation loss against step (left) and ``right`` (see :func:`curve_series`; log scale for
    perplexity) with ``references`` (label -> value, e.g. the unigram perplexity) as horizontal lines.  The plotted
    series are written beside the PNG (``curves.json``), so what a plot shows can be checked against metrics.jsonl.
    Returns False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    series = curve_series(metrics, right)
    train, val, panel = series["train loss"], series["validation loss"], series[right]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    if panel:
        ax.plot(*zip(*panel), "o-", color="C1", ms=3, label=right)
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, ls="--", color=f"C{i + 2}", lw=1, label=label)
    perplexity = right == VAL_PERPLEXITY
    if perplexity and (panel or references):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(right + (" (log scale)" if perplexity else ""))
    ax.grid(alpha=0.3, which="both")
    if references:
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    atomic_write_json(Path(out_png).with_suffix(".json"), {**series, "references": references or {}})
    return True


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class Report:
    title: str
    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, heading: str, body: str) -> None:
        self.sections.append((heading, body.strip()))

    def render(self) -> str:
        parts = [f"# {self.title}", ""]
        for heading, body in self.sections:
            parts += [f"## {heading}", "", body, ""]
        return "\n".join(parts)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.render())
        return path


# ---- fine-tuning ---------------------------------------------------------------------------------
def _baseline_rows(baselines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"model": f"baseline: {name.replace('_', ' ')}", **{k: v for k, v in vals.items() if isinstance(v, float)}}
            for name, vals in baselines.items()]


def finetune_section(result: dict[str, Any]) -> str:
    """Markdown for one fine-tuning run (``finetune``'s result) or a comparison (``compare``'s)."""
    if "summary" in result:  # a comparison: pretrained vs random vs baselines
        metric = result["metric"]
        rows = [{"model": f"{s['init']} ({s['runs']} seeds)", f"test {metric} (mean)": s["mean"], "std": s["std"],
                 "per seed": ", ".join(f"{v:.3f}" for v in s["values"])} for s in result["summary"]]
        rows += [{"model": r["model"], f"test {metric} (mean)": r.get(metric, r.get("accuracy", r.get("exact_match")))}
                 for r in _baseline_rows(result["baselines"])]
        first = result["runs"][0]
        body = [f"Task **{result['task']}** ({first['type']}; {first['description']}) on a **{result['family']}** model.",
                "", markdown_table(rows)]
        if "pretrained_minus_random" in result:
            body += ["", f"Pretrained − random: **{result['pretrained_minus_random'] * 100:+.1f} points** of test "
                     f"{metric} (same steps, same data, mean over seeds)."]
        body += ["", "Per-run results: `runs/<init>-seed<k>/results.json`; reports there."]
        return "\n".join(body)
    r = result
    metrics = sorted({*r.get("validation", {}), *r.get("test", {})})
    rows = [{"split": split, **{k: r[split].get(k) for k in metrics}} for split in ("validation", "test") if split in r]
    sizes = ", ".join(f"{k} {v}" for k, v in r["sizes"].items())
    trunc = ", ".join(f"{k} {v}" for k, v in r["truncated"].items())
    body = [f"Task **{r['task']}** ({r['type']}, {r['description']}) on a **{r['family']}** model "
            f"({r['init']} weights, seed {r['seed']}, as {r['mode']}).",
            "", f"Examples: {sizes}. Truncated to the model's maximum length: {trunc}."]
    if r.get("closed_book") is not None:
        body += ["", f"{'Closed-book' if r['closed_book'] else 'Open-book'}: {r.get('held_out', '')}"]
    body += ["", f"Best checkpoint by {r['select_metric']}: {r['selected']}; trained {r['train_s']:.1f} s, "
             f"{r['trainable_params']:,} trainable parameters"
             + (f", peak learning rate {r['lr']:g} ({r['lr_from']})." if "lr" in r else "."), "", markdown_table(rows)]
    if r.get("delta"):
        dl = r["delta"]
        body += ["", f"Delta tuning **{dl['method']}**: {dl['trainable']:,} of {dl['total']:,} parameters trained "
                 f"({dl['percent']:.3f}%); delta saved to `{dl['adapter_dir']}` ({dl['adapter_bytes'] / 1024:.1f} KiB)"
                 + (", the merged model to `model/`." if dl.get("merged", True) else
                    " (adapters, prompts, prefixes and ladders do not merge: load the base model and apply the delta with "
                    "lmforge's load_delta, or PEFT's PeftModel for PEFT-format prompts and prefixes).")]
    if r.get("baselines"):
        body += ["", f"Baselines on the {r.get('baselines_split', 'test')} split:", "", markdown_table(_baseline_rows(r["baselines"]))]
    if r.get("test_examples"):
        body += ["", "Test examples (every test prediction: `predictions-test.jsonl`):", "",
                 markdown_table(r["test_examples"])]
    return "\n".join(body)


def write_finetune_report(result: dict[str, Any]) -> Path:
    """``RUN_DIR/report.md`` (and ``curves.png`` for a single run) for ``lmforge finetune``."""
    run_dir = Path(result["run_dir"])
    report = Report(title=f"lmforge finetune — {run_dir.name}")
    if "summary" not in result:
        metrics = read_metrics(run_dir / "metrics.jsonl")
        # the task's own metric (accuracy, exact match ...) on the right, beside its baselines' scores
        right = result["select_metric"]
        split = result.get("baselines_split", "test")
        refs = {f"baseline: {name.replace('_', ' ')} ({split})": vals[right.removeprefix("val_")]
                for name, vals in (result.get("baselines") or {}).items()
                if _number(vals.get(right.removeprefix("val_")))}
        if plot_curves(metrics, run_dir / "curves.png", title="fine-tuning", right=right, references=refs):
            report.add("Curves", f"![training and validation loss, {right}](curves.png)")
    report.sections.insert(0, ("Fine-tuning", finetune_section(result)))
    return report.write(run_dir / "report.md")


# ---- lmforge bench peft ------------------------------------------------------------------------------
def _bench_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    mb = 1 / 2**20
    out = []
    for r in rows:
        m = r["memory"]
        out.append({"method": r["method"], "lr": f"{r['lr']:.0e}", "trainable": f"{r['trainable']:,}",
                    "trainable %": f"{r['trainable_pct']:.3f}",
                    "val acc": r["val_accuracy"], "test acc (mean ± std)":
                    f"{r['test_accuracy']:.3f} ± {r['test_std']:.3f}" if r["test_accuracy"] is not None else "-",
                    "memory MiB (params+grads+optim+activations)":
                    f"{m['total'] * mb:.1f} ({m['parameters'] * mb:.1f}+{m['gradients'] * mb:.1f}+"
                    f"{m['optimizer'] * mb:.1f}+{m['activations'] * mb:.1f})" if m.get("total") else "-",
                    "s/step": r["s_per_step"], "tokens/s": r["tokens_per_s"],
                    "saved KiB": f"{r['saved_bytes'] / 1024:.1f}", "steps to 95% of best": r["steps_to_95"]})
    return out


def _bench_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    names = [r["method"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    acc = [r["test_accuracy"] or 0.0 for r in rows]
    a.bar(names, acc, yerr=[r["test_std"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        a.text(i, acc[i] + 0.01, f"{r['trainable_pct']:.2g}%", ha="center", fontsize=8)
    a.set_ylim(0, 1.05)
    a.set_title("test accuracy (mean over seeds; label: % trained)")
    bottom = [0.0] * len(rows)
    for part, colour in (("parameters", "tab:gray"), ("gradients", "tab:orange"), ("optimizer", "tab:red"),
                         ("activations", "tab:green")):
        vals = [(r["memory"].get(part) or 0) / 2**20 for r in rows]
        b.bar(names, vals, bottom=bottom, label=part, color=colour)
        bottom = [x + y for x, y in zip(bottom, vals)]
    b.set_title("training memory (MiB)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_bench_peft_report(out: dict[str, Any]) -> Path:
    run_dir = Path(out["run_dir"])
    plotted = _bench_plot(out["summary"], run_dir / "bench.png")
    full = next((r for r in out["summary"] if r["method"] == "full"), None)
    lines = [f"# lmforge bench peft — {out['family']} on {out['task']}", "",
             f"Each method fine-tuned in its own process over seeds {out['config']['seeds']}, from "
             f"`{out['config']['finetune']}`.", "", markdown_table(_bench_table(out["summary"]))]
    if full and full["test_accuracy"] is not None:
        gaps = ", ".join(f"{r['method']} {100 * (r['test_accuracy'] - full['test_accuracy']):+.1f}"
                         for r in out["summary"] if r["method"] != "full" and r["test_accuracy"] is not None)
        lines += ["", f"Test accuracy vs full fine-tuning (points): {gaps}."]
    if plotted:
        lines += ["", "![accuracy and memory per method](bench.png)"]
    lines += ["", "Memory is counted, not sampled: parameters + gradients + AdamW state + the bytes autograd saves "
              "for backward on one micro-batch (saved-tensor hooks).", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# ---- eval instructions -------------------------------------------------------------------------------------
INSTRUCTION_COLUMNS = {"sft": "SFT model, zero-shot", "base_zero": "base, zero-shot", "base_few": "base, few-shot",
                       "base_likelihood": "base, likelihood"}

FLAN_CAVEAT = (
    "Held-out task types measure zero-shot generalisation to tasks never seen in SFT (FLAN's and T0's question).  "
    "FLAN (Wei et al. 2022, its model-scale ablation) found that below about 8B parameters instruction tuning can *hurt* unseen "
    "tasks: a small model spends its capacity on the seen tasks.  A model of this size may show exactly that; "
    "the numbers are reported whatever they show.  Closed-book types need facts pretraining had to teach: "
    "instruction tuning can change how the model answers, not what it knows.")


def instructions_tables(result: dict[str, Any]) -> str:
    """`lmforge eval instructions`' result as markdown: means per split and kind, then every task type."""
    cols = result["columns"]
    head = ["split", "kind", "types"] + [INSTRUCTION_COLUMNS[c] for c in cols]

    def named(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, **{INSTRUCTION_COLUMNS[c]: ("-" if row.get(c) is None else row[c]) for c in cols}}

    summary = markdown_table([named(r) for r in result["summary"]], head)
    chance = ["chance (likelihood)"] if "base_likelihood" in cols else []
    per_type = markdown_table([{**named(r), "chance (likelihood)": "-" if r.get("chance") is None else r["chance"]}
                               for r in result["rows"]],
                              ["split", "type", "kind", "n"] + [INSTRUCTION_COLUMNS[c] for c in cols] + chance)
    shots = f"; few-shot: {result['shots']} solved records of the same type (train entities) in front" \
        if "base_few" in cols else ""
    skipped = {k: v for k, v in result.get("skipped", {}).items() if v}
    note = f"  Left out (prompt longer than the context): {skipped}." if skipped else ""
    if chance:
        note += ("  Likelihood: closed-book types only, the base model's pick of the most likely candidate answer after "
                 "its few-shot prompt (lm-eval's rule; candidates: the labels, the number and its neighbours ±1 ±2, or "
                 "the answer and another entity's value of the same relation), chance beside it.")
    return (f"Exact match (the records' verifiers, first line of a greedy reply), {result['n_per_type']} records per "
            f"task type and split{shots}.  Held-out types: {', '.join(result['held_out_types'])}.{note}\n\n"
            f"Mean over task types:\n\n{summary}\n\nPer task type:\n\n{per_type}\n\n{FLAN_CAVEAT}")


# ---- lmforge w2s ---------------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return f"{v * 100:.1f}" if _number(v) else "-"


def _span(iv: Any) -> str:
    return f"[{_pct(iv[0])}, {_pct(iv[1])}]" if iv else "-"


def _w2s_plot(out: dict[str, Any], path: Path) -> bool:
    """Test accuracy per model (median over seeds, bootstrap interval) and PGR per student (per seed, median)."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rows = out["accuracy"]
    names = [r["model"] for r in rows]
    med = [r["accuracy_median"] for r in rows]
    err = [[m - (r["accuracy_interval"] or [m, m])[0] for m, r in zip(med, rows)],
           [(r["accuracy_interval"] or [m, m])[1] - m for m, r in zip(med, rows)]]
    a.bar(names, med, yerr=err, color="tab:blue", capsize=4)
    for i, r in enumerate(rows):
        a.scatter([i] * len(r["accuracy_per_seed"]), r["accuracy_per_seed"], color="black", s=10, zorder=3)
    a.set_ylim(min(0.4, min(med) - 0.05), 1.02)
    a.set_title(f"{out['task']}: test accuracy (median of seeds, {out['confidence']:.0%} interval; dots: seeds)")
    a.tick_params(axis="x", labelsize=8)
    for i, r in enumerate(out["pgr"]):
        vals = [v for v in r["pgr_per_seed"] if v is not None]
        b.scatter([i] * len(vals), vals, color="black", s=12, zorder=3)
        if r["pgr_median"] is not None:
            lo, hi = r["pgr_interval"] or [r["pgr_median"]] * 2
            b.errorbar([i], [r["pgr_median"]], yerr=[[r["pgr_median"] - lo], [hi - r["pgr_median"]]], fmt="o",
                       color="tab:red", capsize=4)
    b.set_xticks(range(len(out["pgr"])), [r["student"] for r in out["pgr"]], fontsize=8)
    b.axhline(0, color="gray", lw=0.8)
    b.axhline(1, color="gray", lw=0.8, ls="--")
    b.set_title("PGR = (w2s − weak) / (ceiling − weak)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_w2s_report(out: dict[str, Any]) -> Path:
    """``RUN_DIR/report.md`` and ``w2s.png`` for ``lmforge w2s``."""
    run_dir = Path(out["run_dir"])
    report = Report(title=f"lmforge w2s — {out['task']}")
    params = ", ".join(f"{k} {v:,}" for k, v in out["parameters"].items())
    report.add("Setup", f"Task **{out['task']}** ({out['description']}); labels {out['labels']}.  Split A "
               f"({out['n_weak']} examples) trains the weak model on ground truth; split B ({out['n_student']}) is "
               f"labelled by it for the student and trains the ceiling on ground truth.  Weak `{out['weak_model']}`, "
               f"strong `{out['strong_model']}`" + (f", chain {out['chain']}" if out["chain"] else "") +
               f" (parameters: {params}).  Seeds {out['seeds']}; every run keeps its final model after a fixed "
               f"number of steps (no checkpoint chosen on ground truth).  Confidence loss: aux_coef "
               f"{out['aux_coef']}, warmup_frac {out['warmup_frac']}.")
    acc_rows = [{"model": r["model"], "test accuracy % (median)": _pct(r["accuracy_median"]),
                 f"{out['confidence']:.0%} interval": _span(r["accuracy_interval"]),
                 "per seed": ", ".join(_pct(v) for v in r["accuracy_per_seed"])} for r in out["accuracy"]]
    report.add("Accuracy", markdown_table(acc_rows) + f"\n\nIntervals: percentile bootstrap over the "
               f"{out['test_examples']} test examples ({out['bootstrap']} resamples, paired: one resample for every "
               f"model and seed), of the median over seeds.")
    pgr_rows = []
    for r in out["pgr"]:
        agree = [x["all"] for x in r["agreement_with_weak"]]
        wrong = [x["weak_wrong"] for x in r["agreement_with_weak"] if x["weak_wrong"] is not None]
        pgr_rows.append({"student": r["student"], "PGR % (median)": _pct(r["pgr_median"]),
                         f"{out['confidence']:.0%} interval": _span(r["pgr_interval"]),
                         "per seed (interval)": "; ".join(f"{_pct(v)} {_span(iv)}" for v, iv in
                                                          zip(r["pgr_per_seed"], r["pgr_interval_per_seed"])),
                         "agrees with weak %": _pct(statistics.fmean(agree)),
                         "copies weak's errors %": _pct(statistics.fmean(wrong)) if wrong else "-"})
    report.add("Performance gap recovered", markdown_table(pgr_rows) + "\n\nPGR = (w2s − weak) / (ceiling − weak) "
               "per seed (none where the ceiling does not beat weak).  *Agrees with weak*: test examples where the "
               "student predicts the weak model's label; *copies weak's errors*: the same, on the test examples "
               "the weak model gets wrong (1.0 = it imitates every error, 0 = it fixes them all).")
    if _w2s_plot(out, run_dir / "w2s.png"):
        report.add("Plot", "![accuracy and PGR](w2s.png)")
    report.add("Runs", "Per seed: `seed<k>/weak`, `seed<k>/strong-<loss>`, `seed<k>/ceiling`"
               + (", `seed<k>/chain<i>`" if out["chain"] else "") + " (fine-tuning runs: results.json, "
               "predictions-test.jsonl, report-free); the summary: `w2s.json`.")
    return report.write(run_dir / "report.md")
