"""The in-context curve (GPT-3's figure in miniature): accuracy vs k demonstrations on world tasks, for several
model sizes, beside chance.

    python benchmarks/incontext_curve.py --run-dir runs/incontext-curve            # pretrains 3 sizes, then scores
    python benchmarks/incontext_curve.py --models small=DIR medium=DIR large=DIR   # scores given model dirs

Pretraining (``lmforge pretrain``, one single-threaded process per size, side by side) is cached in
RUN_DIR/<size>: a size whose ``model/`` exists is reused and an interrupted one resumes from its last checkpoint
(``resume=auto``).  Models are trained on windows of 256 tokens, so 8-shot prompts fit (longer ones are left-cut,
as lm-eval cuts them).  Each size's scores are cached in RUN_DIR/scores-<size>.json.  Writes
RUN_DIR/incontext_curve.{json,png,md}; the JSON line is the last line printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from lmforge.recipes.incontext import (SHOTS, InContextSettings, evaluate_incontext, format_table,  # noqa: E402
                                       headline, load_decoder, results_table)

# name -> model overrides; the same data, steps and tokens per step for every size
SIZES = {
    "small": ["model.d_model=64", "model.n_layer=2", "model.n_head=2"],
    "medium": ["model.d_model=128", "model.n_layer=3", "model.n_head=4"],
    "large": ["model.d_model=192", "model.n_layer=4", "model.n_head=6"],
}
COMMON = ["data.seq_len=256", "model.max_seq_len=256", "train.global_batch_size=8", "train.eval_every=200",
          "train.ckpt_every=200", "resume=auto"]
TASKS = ["world-fact", "world-arithmetic", "world-kind", "world-true-false", "world-sentiment"]


def pretrain_all(run_dir: Path, steps: int) -> dict[str, str]:
    """Every size not yet trained, one single-threaded ``lmforge pretrain`` process each, side by side."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = []
    for name, overrides in SIZES.items():
        out = run_dir / name
        if (out / "model" / "model.safetensors").is_file():
            continue
        cmd = [sys.executable, "-m", "lmforge", "pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={out}",
               f"max_steps={steps}", *COMMON, *overrides]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        log = open(run_dir / f"{name}.log", "a")
        procs.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
    for name, p in procs:
        if p.wait() != 0:
            raise SystemExit(f"pretraining {name} failed (exit {p.returncode}); see {run_dir / (name + '.log')}")
    return {name: str(run_dir / name / "model") for name in SIZES}


def plot(results: dict[str, dict], png: Path) -> bool:
    try:
        # optional extra: pip install 'lmforge[plots]'
        import matplotlib
        matplotlib.use("Agg")
        # optional extra: pip install 'lmforge[plots]'
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(next(iter(results.values()))["scores"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, r in results.items():
            per = r["scores"][task]
            ks = sorted(per, key=int)
            ax.plot([int(k) for k in ks], [headline(per[k])[1] for k in ks], marker="o",
                    label=f"{name} ({r['params'] / 1e6:.1f}M)")
        chance = next(iter(results.values()))["scores"][task][str(SHOTS[0])]["chance"]
        ax.axhline(chance, color="grey", linestyle="--", label="chance")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("k (demonstrations)")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(list(SHOTS), [str(k) for k in SHOTS])
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/incontext-curve")
    ap.add_argument("--models", nargs="*", default=None, metavar="NAME=DIR", help="score these instead of pretraining")
    ap.add_argument("--steps", type=int, default=500, help="pretraining steps per size")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--n", type=int, default=200, help="evaluated examples per task")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = dict(m.split("=", 1) for m in args.models) if args.models else pretrain_all(run_dir, args.steps)
    t_train = time.perf_counter() - t0
    settings = InContextSettings(tasks=list(args.tasks), shots=list(SHOTS), n=args.n)
    results, lines = {}, []
    for name, path in models.items():
        # scores of a model dir are cached beside the curve (the same dir, tasks, n and k reuse them), so a size
        # can be scored as soon as it is trained and the final call only draws the table and the plot
        cache = run_dir / f"scores-{name}.json"
        key = {"dir": str(Path(path).resolve()), "tasks": list(args.tasks), "n": args.n, "shots": list(SHOTS)}
        cached = json.loads(cache.read_text()) if cache.is_file() else None
        if cached is not None and cached["key"] == key:
            results[name] = cached["result"]
        else:
            t = time.perf_counter()
            model, tok = load_decoder(path, "cpu")
            scores = evaluate_incontext(model, tok, settings)
            params = sum(p.numel() for p in model.parameters())
            results[name] = {"dir": path, "params": params, "seconds": round(time.perf_counter() - t, 1),
                             "load": os.getloadavg(),
                             "scores": {task: {str(k): m for k, m in per.items()} for task, per in scores.items()}}
            cache.write_text(json.dumps({"key": key, "result": results[name]}))
        params = results[name]["params"]
        scores = {task: {int(k): m for k, m in per.items()} for task, per in results[name]["scores"].items()}
        header, rows = results_table(scores)
        block = f"{name} ({params / 1e6:.2f}M parameters, {path})\n" + format_table(header, rows)
        print(block, flush=True)
        lines.append(block)
    drew = plot(results, run_dir / "incontext_curve.png")
    summary = {"machine": machine(), "load": os.getloadavg(), "pretrain_s": round(t_train, 1), "n": args.n,
               "shots": list(SHOTS), "models": results, "plot": str(run_dir / "incontext_curve.png") if drew else None}
    (run_dir / "incontext_curve.json").write_text(json.dumps(summary, indent=1))
    (run_dir / "incontext_curve.md").write_text("\n\n".join(lines) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
