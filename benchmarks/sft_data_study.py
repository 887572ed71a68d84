"""The instruction-tuning data study (issue 27): less or more SFT data, diverse or focused?

From one pretrained model (the pipeline's ``RUN_DIR/model``), ``lmforge sft`` on the world's instructions with
``n`` examples (``--sizes``) spread over every seen task type (the *diverse* mix), and with the same number of
examples from ``--focused`` types only (the *focused* mix, at ``--focused-size``), each over ``--seeds``; every run
trains the same number of steps (equal compute: smaller sets are seen more often, LIMA's setting).  Each SFT model is
scored by ``lmforge eval instructions`` (greedy exact match, :mod:`lmforge.recipes.instructions`) on held-out
entities (seen types; for the focused mix most of them are types it never trained on) and on held-out task types.

Prints one line per run and a table of means over seeds; writes the plot (``--out``/sft_data.png) and the last
line is JSON with every run's numbers.  There is no reference implementation to race: this is a study, not a speed
benchmark.  CPU-heavy: one thread, small steps (see RESULTS.md for the command used).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from lmforge.recipes.instructions import evaluate_instructions, headline  # noqa: E402
from lmforge.recipes.sft import WORLD_INSTRUCTIONS, SFTConfig, SFTDataConfig, sft, sft_train_defaults  # noqa: E402

MEASURES = {"held-out entities, in-context": "test_entities/in_context/sft",
            "held-out entities, closed-book": "test_entities/closed_book/sft",
            "held-out types, in-context": "test_types/in_context/sft",
            "held-out types, closed-book": "test_types/closed_book/sft"}


def one_run(args, out: Path, n: int, seed: int, types: list[str] | None) -> dict:
    mix = "focused" if types else "diverse"
    run_dir = out / f"{mix}-n{n}-s{seed}"
    train = sft_train_defaults()
    train.lr, train.global_batch_size, train.warmup_steps = args.lr, args.batch, max(1, args.steps // 10)
    train.eval_every, train.ckpt_every, train.log_every = args.steps, args.steps, max(1, args.steps // 5)
    cfg = SFTConfig(run_dir=str(run_dir), seed=seed, max_steps=args.steps, resume="auto", model=args.model,
                    data=SFTDataConfig(train=WORLD_INSTRUCTIONS, n_train=n, n_val=50, types=types), train=train)
    if not (run_dir / "model" / "model.safetensors").is_file():
        sft(cfg, progress=False)
    ev = evaluate_instructions(str(run_dir / "model"), n_per_type=args.eval_n)
    em = headline(ev)
    row = {"mix": mix, "n": n, "seed": seed, **{k: em.get(v) for k, v in MEASURES.items()}}
    print(json.dumps(row), flush=True)
    return row


def mean_rows(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mix"], r["n"]), []).append(r)
    out = []
    for (mix, n), rs in sorted(groups.items()):
        row = {"mix": mix, "n": n, "seeds": len(rs)}
        for k in MEASURES:
            vals = [r[k] for r in rs if r[k] is not None]
            row[k] = statistics.mean(vals) if vals else None
            row[k + " (sd)"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def plot(means: list[dict], path: Path) -> bool:
    try:
        import matplotlib  # optional: pip install -e ".[plots]"
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: pip install -e ".[plots]"

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    diverse = [m for m in means if m["mix"] == "diverse"]
    for i, k in enumerate(MEASURES):
        xs, ys, es = [m["n"] for m in diverse], [m[k] for m in diverse], [m[k + " (sd)"] for m in diverse]
        axes[0].errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=k, color=f"C{i}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("SFT examples (diverse mix, same steps)")
    axes[0].set_ylabel("exact match (mean over types, ± sd over seeds)")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    focused = [m for m in means if m["mix"] == "focused"]
    if focused:
        size = focused[0]["n"]
        pair = [m for m in diverse if m["n"] == size] + focused
        width = 0.38
        for j, m in enumerate(pair):
            axes[1].bar([i + (j - 0.5) * width for i in range(len(MEASURES))], [m[k] or 0 for k in MEASURES], width,
                        yerr=[m[k + " (sd)"] for k in MEASURES], capsize=3, label=f"{m['mix']} (n={m['n']})")
        axes[1].set_xticks(range(len(MEASURES)), [k.replace(", ", "\n") for k in MEASURES], fontsize=7)
        axes[1].set_ylim(0, 1.02)
        axes[1].set_ylabel("exact match")
        axes[1].legend(fontsize=7)
        axes[1].set_title("diverse vs focused at equal size", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the pretrained model (the pipeline's RUN_DIR/model)")
    p.add_argument("--out", default="runs/sft_data_study", help="run dirs, the plot and results.json")
    p.add_argument("--sizes", default="100,300,1000,3000")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--focused", default="count,sort,position", help="the focused mix's types")
    p.add_argument("--focused-size", type=int, default=1000)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-n", type=int, default=10, help="records per type and split")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes, seeds = [int(x) for x in args.sizes.split(",")], [int(x) for x in args.seeds.split(",")]
    print(f"machine: {machine()}", flush=True)
    rows = [one_run(args, out, n, s, None) for s in seeds for n in sizes]
    rows += [one_run(args, out, args.focused_size, s, args.focused.split(",")) for s in seeds]
    means = mean_rows(rows)
    for m in means:
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))
    plotted = plot(means, out / "sft_data.png")
    result = {"machine": machine(), "args": vars(args), "runs": rows, "means": means,
              "plot": str(out / "sft_data.png") if plotted else None}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
