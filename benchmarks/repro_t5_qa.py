"""Issue 5's T5 bar, end to end: pretrain the tiny T5, fine-tune it on open-book world QA over 3 seeds beside the
same architecture from random init, and check the bars.

    python benchmarks/repro_t5_qa.py                          # the bar: ~35 min pretraining + 6 fine-tunes of ~9 min
    python benchmarks/repro_t5_qa.py --model runs/tiny-t5/model   # skip pretraining, compare only

Steps, both run through the CLI in processes of their own:

1. ``lmforge pretrain configs/tiny-t5.yaml max_steps=1200`` -- span corruption with half the windows reconstructing
   the whole text (``span.full_text_fraction``), Adafactor;
2. ``lmforge finetune configs/finetune-t5-qa.yaml --compare model=...`` -- pretrained vs random init, seeds 0-2,
   test exact match, the task's baselines, and ``report.md`` with them side by side.

It prints one JSON line (per-seed figures, means, the gap, ``bar_met``) and exits 1 when the pretrained mean is
below ``--min-em`` (0.90) or random init is fewer than ``--min-gap`` (0.10) below it; 2 when a step fails.  CI runs a smaller version of step 2
(tests/acceptance/test_finetune_learns.py, with its own bars); the figures of full runs are in
benchmarks/RESULTS.md (T5 section).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def lmforge(*args: str) -> None:
    cmd = [sys.executable, "-m", "lmforge", *args]
    print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        fail(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}); see its output above")


def fail(msg: str) -> NoReturn:
    print(f"repro_t5_qa: {msg}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/repro-t5-qa", help="pretraining in RUN_DIR/pretrain (resumed if "
                    "it was cut short), the comparison in RUN_DIR/compare (must not exist yet)")
    ap.add_argument("--model", help="an already pretrained T5 model dir: skip step 1")
    ap.add_argument("--pretrain-steps", type=int, default=1200)
    ap.add_argument("--finetune-steps", type=int, help="default: configs/finetune-t5-qa.yaml's max_steps (1000)")
    ap.add_argument("--min-em", type=float, default=0.90, help="bar for the pretrained runs' mean test exact match")
    ap.add_argument("--min-gap", type=float, default=0.10, help="bar for pretrained minus random init (means)")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for the fine-tuning runs")
    args = ap.parse_args()

    run_dir = Path(args.run_dir).resolve()
    t0 = time.perf_counter()
    model = str(Path(args.model).resolve()) if args.model else None  # the commands run in the repository root
    if model is None:
        lmforge("pretrain", str(ROOT / "configs/tiny-t5.yaml"), f"max_steps={args.pretrain_steps}",
                f"run_dir={run_dir / 'pretrain'}", "resume=auto")
        model = str(run_dir / "pretrain" / "model")
    t1 = time.perf_counter()
    steps = [f"max_steps={args.finetune_steps}"] if args.finetune_steps else []
    lmforge("finetune", str(ROOT / "configs/finetune-t5-qa.yaml"), "--compare", f"model={model}",
            f"run_dir={run_dir / 'compare'}", *steps, *args.overrides)
    res = json.loads((run_dir / "compare" / "compare.json").read_text())
    rows = {row["init"]: row for row in res["summary"]}
    if set(rows) != {"pretrained", "random"}:
        fail(f"{run_dir / 'compare' / 'compare.json'} has test scores for {sorted(rows)}; both pretrained and random "
             f"are needed (do not set compare.random_init=false)")
    pre, rnd = rows["pretrained"], rows["random"]
    out = {"task": res["task"], "metric": res["metric"], "model": model,
           "pretrained": pre["values"], "pretrained_mean": pre["mean"],
           "random": rnd["values"], "random_mean": rnd["mean"], "gap": pre["mean"] - rnd["mean"],
           "baselines": res["baselines"], "pretrain_s": round(t1 - t0, 1),
           "compare_s": round(time.perf_counter() - t1, 1),
           "report": str(run_dir / "compare" / "report.md"), "machine": machine()}
    out["bar_met"] = pre["mean"] >= args.min_em and out["gap"] >= args.min_gap
    print(json.dumps(out))
    if not out["bar_met"]:
        print(f"repro_t5_qa: bar not met: pretrained mean test {res['metric']} {pre['mean']:.3f} (need >= "
              f"{args.min_em}), random init {out['gap']:.3f} lower (need >= {args.min_gap})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
