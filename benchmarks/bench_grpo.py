"""A full GRPO step (rollouts + update): lmforge vs TRL's ``GRPOTrainer`` (transformers generation), one process.

Same model (a random GPT-2 built here, saved once, loaded by both), same prompts (the world's instruction prompts as
plain text, tokenized by the same tokenizer), the same G, the same completion length (every answer runs to
``--new-tokens``: lmforge ignores EOS, TRL gets ``min_new_tokens``), the same reward function, loss ``dapo``, β = 0,
μ = 1, AdamW, fp32, one optimizer step per batch of rollouts.  Each side's step is split into generate (sampling the
answers), score (rewards and the log-prob passes a step needs before its update) and update (forward/backward/step):
lmforge from its rollout source's clocks and the step's wall time, TRL from its own methods (``_generate``;
``_generate_and_score_completions`` minus it; the rest of ``training_step``).  Steps ``--warmup`` onwards are timed,
best of ``--rounds`` alternating rounds; the last line is JSON with ``ratio`` = TRL step time / lmforge step time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from lmforge.core.tokenizer import Tokenizer  # noqa: E402
from lmforge.data.world.instructions import build_instructions  # noqa: E402
from lmforge.eval.generate import generate  # noqa: E402
from lmforge.eval.sampling import GenerationConfig  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.io import load_model, save_model  # noqa: E402
from lmforge.objectives.rl import GRPOObjective  # noqa: E402
from lmforge.rl.algos import GRPOAlgo  # noqa: E402
from lmforge.rl.rewards import Rewards, RewardConfig  # noqa: E402
from lmforge.rl.rollouts import Prompt, RolloutConfig, RolloutSource  # noqa: E402
from lmforge.train.run import RunSpec  # noqa: E402
from lmforge.train.trainer import Trainer, TrainerConfig  # noqa: E402

REWARD = "benchmarks.bench_grpo:reward"


def reward(prompt: str, answer: str, record: dict) -> float:
    """Cheap and varied: the share of letters among the answer's characters (the same function for both)."""
    return sum(c.isalpha() for c in answer) / max(len(answer), 1)


def trl_reward(prompts, completions, **kw):
    return [reward(p, c, {}) for p, c in zip(prompts, completions)]


def build_model(out: Path, d_model: int, n_layer: int) -> tuple[Path, list[str]]:
    recs = build_instructions("train", 8, types=["count", "position", "sort", "extract"])
    texts = [r["messages"][0]["content"] for r in recs]
    tok = Tokenizer.train(texts * 4, vocab_size=2000)
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(family="gpt2", vocab_size=tok.vocab_size, d_model=d_model, n_layer=n_layer,
                                    n_head=max(1, d_model // 64), max_seq_len=512, eos_token_id=tok.eos_id,
                                    bos_token_id=tok.bos_id, dropout=0.0))
    save_model(model, out, tokenizer=tok)
    return out, texts


def lmforge_steps(model_dir: Path, prompts: list[str], G: int, N: int, steps: int, warmup: int, lr: float,
                  run_dir: Path) -> dict[str, float]:
    model, tok = load_model(model_dir)
    P = len(prompts)
    items = [Prompt(tok.encode(t), {}, t, []) for t in prompts]
    rewards = Rewards([RewardConfig(kind="function", function=REWARD)])
    obj = GRPOObjective(loss_type="dapo", temperature=1.0, max_completion_length=N)
    algo = GRPOAlgo(obj, None, None, "group")  # μ = 1: old log-probs are the update's own (TRL's shortcut too)
    src = RolloutSource(items, RolloutConfig(num_generations=G, max_new_tokens=N), rewards, algo, seed=0,
                        rows_per_step=P * G, updates=1, minibatches=1, stop_ids=[], pad_id=tok.eos_id, tokenizer=tok)
    src.gen_cfg = GenerationConfig(max_new_tokens=N, temperature=1.0, ignore_eos=True)
    cfg = TrainerConfig(global_batch_size=P * G, lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0,
                        log_every=1, ckpt_every=0, eval_every=0, device="cpu", tensorboard=False, grad_clip=1.0)
    trainer = Trainer(model, obj, src, cfg, RunSpec(run_dir, steps, seed=0, resume="false"), progress=False)
    src.generate = lambda p, c, *, num_samples, generator: generate(trainer.model, p, c, num_samples=num_samples,
                                                                   generator=generator, tokenizer=tok,
                                                                   pad_id=tok.eos_id, grad_mode="no_grad")
    marks: list[tuple[float, float, float]] = []  # (time the step's batch was asked for, generate_s, score_s)
    ask = src.next_batch

    def timed(n):
        t = time.perf_counter()
        b = ask(n)
        marks.append((t, float(b["stat/time/generate_s"][0]), float(b["stat/time/score_s"][0])))
        return b

    src.next_batch = timed
    trainer.fit()
    end = time.perf_counter()
    starts = [m[0] for m in marks] + [end]
    total = [starts[i + 1] - starts[i] for i in range(warmup, steps)]
    gen = [marks[i][1] for i in range(warmup, steps)]
    score = [marks[i][2] for i in range(warmup, steps)]
    n = len(total)
    step = sum(total) / n
    return {"step_s": step, "generate_s": sum(gen) / n, "score_s": sum(score) / n,
            "update_s": step - (sum(gen) + sum(score)) / n}


def trl_steps(model_dir: Path, prompts: list[str], G: int, N: int, steps: int, warmup: int, lr: float,
              out: Path) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    P = len(prompts)
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=P * G, num_generations=G,
                      max_completion_length=N, gradient_accumulation_steps=1, num_iterations=1, beta=0.0,
                      loss_type="dapo", learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
                      max_grad_norm=1.0, max_steps=steps, logging_steps=1, save_strategy="no", report_to=[],
                      use_cpu=True, bf16=False, fp16=False, temperature=1.0, top_k=0, top_p=1.0,
                      generation_kwargs={"min_new_tokens": N}, dataloader_num_workers=0, seed=0,
                      disable_tqdm=True)
    data = Dataset.from_list([{"prompt": t} for t in prompts] * (steps + 2))
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=args, train_dataset=data, processing_class=tok)
    clocks = {"generate": [], "gen_score": [], "step_end": []}
    gen, gen_score = trainer._generate, trainer._generate_and_score_completions

    def timed_gen(*a, **k):
        t = time.perf_counter()
        out_ = gen(*a, **k)
        clocks["generate"].append(time.perf_counter() - t)
        return out_

    def timed_gen_score(*a, **k):
        t = time.perf_counter()
        out_ = gen_score(*a, **k)
        clocks["gen_score"].append(time.perf_counter() - t)
        return out_

    trainer._generate, trainer._generate_and_score_completions = timed_gen, timed_gen_score

    class Ends(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clocks["step_end"].append(time.perf_counter()) if not clocks["step_end"] else None

        def on_step_end(self, *a, **k):
            clocks["step_end"].append(time.perf_counter())

    trainer.add_callback(Ends())
    trainer.train()
    ends = clocks["step_end"]  # [begin of step 1, end of 1, end of 2, ...]
    total = [ends[i + 1] - ends[i] for i in range(warmup, steps)]
    g = clocks["generate"][warmup:steps]
    gs = clocks["gen_score"][warmup:steps]
    n = len(total)
    step = sum(total) / n
    return {"step_s": step, "generate_s": sum(g) / n, "score_s": (sum(gs) - sum(g)) / n,
            "update_s": step - sum(gs) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks the script runs")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.G, a.new_tokens, a.d_model, a.layers, a.steps, a.rounds = 2, 2, 4, 64, 1, 2, 1
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, texts = build_model(Path(tmp) / "model", a.d_model, a.layers)
        prompts = texts[: a.prompts]
        best: dict[str, dict[str, float]] = {}
        for r in range(a.rounds):
            for name, fn in (("lmforge", lmforge_steps), ("trl", trl_steps)):
                res = fn(model_dir, prompts, a.G, a.new_tokens, a.steps, a.warmup, 1e-5, Path(tmp) / f"{name}{r}")
                if name not in best or res["step_s"] < best[name]["step_s"]:
                    best[name] = res
        for name, res in best.items():
            print(f"{name:8s} step {res['step_s']:.3f}s = generate {res['generate_s']:.3f}s + score "
                  f"{res['score_s']:.3f}s + update {res['update_s']:.3f}s")
        ratio = best["trl"]["step_s"] / best["lmforge"]["step_s"]
        print(f"ratio (TRL step / lmforge step): {ratio:.2f}")
        print(json.dumps({"bench": "grpo_step", "prompts": a.prompts, "G": a.G, "new_tokens": a.new_tokens,
                          "d_model": a.d_model, "layers": a.layers, "threads": a.threads, "machine": machine(),
                          "lmforge": best["lmforge"], "trl": best["trl"], "ratio": ratio}))


if __name__ == "__main__":
    main()
