"""GRPO's calibration run: does it raise held-out verifier accuracy from an SFT model that starts part-way?

A tiny chat model (random init, byte-level BPE) is taught by `lmforge sft` to repeat a made-up word ("Repeat the
word: zorbel" -> "zorbel") for ``--sft-steps`` steps -- long enough to get some held-out words right, not all --
then `lmforge grpo` trains it with the verifier (exact text match of the first line) on other words; the held-out
words (never seen in SFT or GRPO) are scored greedily before and after.  Prints both accuracies and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.core.config import load_config  # noqa: E402
from lmforge.recipes.grpo import GRPOConfig, grpo  # noqa: E402
from lmforge.recipes.sft import SFTConfig, sft  # noqa: E402
from tests.sft_models import tiny_model_dir  # noqa: E402


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))
            for _ in range(n)]


def write(path: Path, ws: list[str], chat: bool) -> Path:
    rows = [({"prompt": f"Repeat the word: {w}", "completion": w} if chat else
             {"prompt": f"Repeat the word: {w}", "answer": w, "check": "text"}) for w in ws]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/lmforge-calibrate-grpo")
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-4)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in ("sft", "grpo"):  # a rerun starts both runs afresh (the base model is reused)
        shutil.rmtree(out / old, ignore_errors=True)
    ws = words(600, 0)
    sft_words, rl_words, held = ws[:200], ws[200:500], ws[500:]
    model = tiny_model_dir(out / "base") if not (out / "base").exists() else out / "base"
    t0 = time.perf_counter()
    scfg = load_config(SFTConfig, None, [f"model={model}", f"run_dir={out / 'sft'}", f"max_steps={a.sft_steps}",
                                         f"data.train={write(out / 'sft.jsonl', sft_words, True)}",
                                         "overwrite=true", "resume=false", "train.lr=1e-3", "train.device=cpu",
                                         "train.tensorboard=false", "train.eval_every=0", "train.ckpt_every=0"])
    sft(scfg, progress=False)
    t1 = time.perf_counter()
    gcfg = load_config(GRPOConfig, None, [
        f"model={out / 'sft' / 'model'}", f"run_dir={out / 'grpo'}", f"max_steps={a.grpo_steps}", "overwrite=true",
        f"data.train={write(out / 'rl.jsonl', rl_words, False)}", f"data.eval={write(out / 'held.jsonl', held, False)}",
        "data.eval_max_new_tokens=8", "rollout.max_new_tokens=8", "rollout.num_generations=8",
        "train.global_batch_size=32", f"train.lr={a.lr}", "train.eval_every=20", "train.ckpt_every=0",
        "train.device=cpu", "train.tensorboard=false", "grpo.loss_type=dapo"])
    r = grpo(gcfg, progress=False)
    t2 = time.perf_counter()
    before, after = r["start"].get("eval/accuracy"), r["last"].get("eval/accuracy")
    print(f"held-out accuracy: SFT model {before:.3f} -> after {a.grpo_steps} GRPO steps {after:.3f} "
          f"(SFT {t1 - t0:.0f}s, GRPO {t2 - t1:.0f}s)")
    print(json.dumps({"bench": "calibrate_grpo", "sft_steps": a.sft_steps, "grpo_steps": a.grpo_steps,
                      "before": before, "after": after, "sft_s": t1 - t0, "grpo_s": t2 - t1}))


if __name__ == "__main__":
    main()
