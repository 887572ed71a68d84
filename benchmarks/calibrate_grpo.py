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
from lmforge.recipes.ppo import PPOConfig, ppo  # noqa: E402
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
    ap.add_argument("--beta", type=float, default=0.0, help="GRPO's k3 KL coefficient (PPO: its start)")
    ap.add_argument("--algo", choices=["grpo", "ppo"], default="grpo")
    ap.add_argument("--target-kl", type=float, default=None, help="PPO: adaptive KL target (per sequence)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # a rerun starts the runs afresh (the base model is reused; --sft-steps 0 reuses the SFT model too)
    for old in (["sft"] if a.sft_steps else []) + ["grpo"]:
        shutil.rmtree(out / old, ignore_errors=True)
    ws = words(600, 0)
    sft_words, rl_words, held = ws[:200], ws[200:500], ws[500:]
    model = tiny_model_dir(out / "base") if not (out / "base").exists() else out / "base"
    t0 = time.perf_counter()
    scfg = load_config(SFTConfig, None, [f"model={model}", f"run_dir={out / 'sft'}", f"max_steps={a.sft_steps}",
                                         f"data.train={write(out / 'sft.jsonl', sft_words, True)}",
                                         "overwrite=true", "resume=false", "train.lr=1e-3", "train.device=cpu",
                                         "train.tensorboard=false", "train.eval_every=0", "train.ckpt_every=0"])
    if a.sft_steps:
        sft(scfg, progress=False)
    t1 = time.perf_counter()
    args = [
        f"model={out / 'sft' / 'model'}", f"run_dir={out / 'grpo'}", f"max_steps={a.grpo_steps}", "overwrite=true",
        f"data.train={write(out / 'rl.jsonl', rl_words, False)}", f"data.eval={write(out / 'held.jsonl', held, False)}",
        "data.eval_max_new_tokens=8", "rollout.max_new_tokens=8", "rollout.num_generations=8",
        "train.global_batch_size=32", f"train.lr={a.lr}", "train.eval_every=20", "train.ckpt_every=0",
        "train.device=cpu", "train.tensorboard=false"]
    if a.algo == "grpo":
        gcfg = load_config(GRPOConfig, None, args + ["grpo.loss_type=dapo", f"grpo.beta={a.beta}"])
        r = grpo(gcfg, progress=False)
    else:
        extra = [f"ppo.kl_coef={a.beta}"] + ([f"ppo.target_kl={a.target_kl}"] if a.target_kl else [])
        r = ppo(load_config(PPOConfig, None, args + extra), progress=False)
    t2 = time.perf_counter()
    before, after = r["start"].get("eval/accuracy"), r["last"].get("eval/accuracy")
    print(f"held-out accuracy: SFT model {before:.3f} -> after {a.grpo_steps} {a.algo.upper()} steps {after:.3f} "
          f"(SFT {t1 - t0:.0f}s, GRPO {t2 - t1:.0f}s)")
    rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    kl_key = "kl" if a.algo == "grpo" else "objective/kl"
    tail = rows[-max(1, len(rows) // 3):]
    kl = sum(r.get(kl_key, 0.0) for r in tail) / len(tail)
    reward_key = "reward" if a.algo == "grpo" else "objective/scores"
    reward = sum(r[reward_key] for r in tail) / len(tail)
    print(f"last third of the run: reward {reward:.3f}, {kl_key} {kl:.4f}")
    print(json.dumps({"bench": "calibrate_grpo", "algo": a.algo, "beta": a.beta, "target_kl": a.target_kl,
                      "sft_steps": a.sft_steps, "grpo_steps": a.grpo_steps, "before": before, "after": after,
                      "reward_last_third": reward, "kl_last_third": kl, "sft_s": t1 - t0, "grpo_s": t2 - t1}))


if __name__ == "__main__":
    main()
