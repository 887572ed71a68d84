"""The pipeline's RL stage: GRPO on the world's verifier tasks from the SFT model (PPO with a reward model optional).

Contract with the SFT stage: ``ctx.results["sft"]["model"]`` is the SFT model dir (``RUN_DIR/sft/model``).  Without
it (no SFT stage ran, or it was switched off) this stage says so in the report and does nothing.  With it, ``lmforge
grpo`` (or ``ppo``) runs in ``RUN_DIR/rl`` on world instruction prompts, scored by the verifier (PPO: by the reward
model ``rl.reward_model`` or ``ctx.results["reward"]["model"]``, plus the verifier), and the report gets the held-out
accuracy before and after, the reward and KL curves (``rl/reward.png``, ``rl/kl.png``) and samples of answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lmforge.apps.report import markdown_table, plot_curves, read_metrics
from lmforge.apps.stage import Context, Stage, say
from lmforge.core.config import require
from lmforge.recipes.grpo import GRPOConfig, GRPOSection, grpo
from lmforge.recipes.ppo import PPOConfig, PPOSection, ppo
from lmforge.recipes.rl_run import PromptDataConfig
from lmforge.rl.rewards import RewardConfig
from lmforge.rl.rollouts import RolloutConfig
from lmforge.train.trainer import TrainerConfig


@dataclass
class PipelineRLConfig:
    enabled: bool = True
    algorithm: str = "grpo"
    """grpo (verifier rewards) or ppo (the world reward model, adaptive KL)."""
    max_steps: int = 40
    types: Optional[list[str]] = field(default_factory=lambda: ["count", "position", "sort", "sentiment"])
    """World instruction types (verifier tasks) to train and evaluate on."""
    n_train: int = 64
    n_eval: int = 16
    num_generations: int = 4
    global_batch_size: int = 16
    max_new_tokens: int = 24
    lr: float = 2e-5
    beta: float = 0.02
    """GRPO's k3 KL coefficient (PPO: the start of the adaptive one); > 0 loads the reference, so the report has a
    KL curve (0: no reference, no KL logged)."""
    target_kl: float = 4.0
    """PPO's per-sequence KL target."""
    reward_model: Optional[str] = None
    """PPO: a reward model dir; None: the pipeline's reward stage's (ctx.results['reward']['model'])."""
    eval_every: int = 10

    def __post_init__(self) -> None:
        require(self.algorithm in ("grpo", "ppo"), "rl.algorithm", self.algorithm, "grpo or ppo")
        require(self.max_steps >= 1, "rl.max_steps", self.max_steps, ">= 1")


def _section(result: dict[str, Any], rl_dir: Path, plots: list[str]) -> str:
    start, last = result.get("start") or {}, result.get("last") or {}
    rows = [{"": "before (SFT model)", **{k: v for k, v in start.items()}},
            {"": f"after {last.get('step', '?')} steps", **{k: last[k] for k in start if k in last}}]
    curves = {k: last.get(k) for k in ("reward", "reward_std", "frac_reward_zero_std", "kl", "objective/kl",
                                       "objective/scores", "completions/mean_length", "time/generate_s",
                                       "time/score_s", "time/update_s") if k in last}
    body = [f"`lmforge {result['algorithm']}` from the SFT model on {result['prompts']['train']} world verifier "
            f"prompts ({result['prompts']['prompts_too_long']} left out as too long); held-out greedy answers:", "",
            markdown_table(rows), "", "Last logged step:", "", markdown_table([curves]) if curves else "(none)", ""]
    body += [f"![{p}](rl/{p})" for p in plots]
    samples = (result.get("samples") or {}).get("held_out") or []
    if samples:
        body += ["", "Held-out answers after training:", "", markdown_table(samples)]
    body += ["", "Run dir: `rl/` (metrics.jsonl, results.json, the trained model in `rl/model`)."]
    return "\n".join(body)


def _config(ctx: Context, sft_model: str) -> GRPOConfig | PPOConfig:
    r = ctx.cfg.rl
    common = dict(run_dir=str(ctx.run_dir / "rl"), seed=ctx.cfg.seed, max_steps=r.max_steps, resume="auto",
                  overwrite=ctx.cfg.overwrite, model=sft_model,
                  data=PromptDataConfig(types=r.types, n_train=r.n_train, n_eval=r.n_eval,
                                        eval_max_new_tokens=r.max_new_tokens),
                  rollout=RolloutConfig(num_generations=r.num_generations, max_new_tokens=r.max_new_tokens),
                  train=TrainerConfig(global_batch_size=r.global_batch_size, lr=r.lr, warmup_steps=0,
                                      schedule="constant", weight_decay=0.0, eval_every=r.eval_every,
                                      ckpt_every=r.eval_every, keep_last=1, log_every=1, grad_clip=1.0,
                                      device=ctx.cfg.train.device, tensorboard=ctx.cfg.train.tensorboard))
    if r.algorithm == "grpo":
        return GRPOConfig(**common, grpo=GRPOSection(beta=r.beta))
    rm = r.reward_model or (ctx.results.get("reward") or {}).get("model")
    rewards = [RewardConfig(kind="verifier")] + ([RewardConfig(kind="model", model=rm)] if rm else [])
    return PPOConfig(**common, rewards=rewards, ppo=PPOSection(kl_coef=max(r.beta, 0.05), target_kl=r.target_kl))


def stage_rl(ctx: Context) -> None:
    r = ctx.cfg.rl
    sft = (ctx.results.get("sft") or {}).get("model")
    if not r.enabled or not sft:
        why = "rl.enabled=false" if not r.enabled else "no SFT model (the SFT stage did not run)"
        ctx.report.add("RL", f"Skipped: {why}.")
        ctx.results["rl"] = {"skipped": why}
        return
    cfg = _config(ctx, str(sft))
    result = grpo(cfg, progress=False) if r.algorithm == "grpo" else ppo(cfg, progress=False)
    rl_dir = Path(cfg.run_dir)
    metrics = read_metrics(rl_dir / "metrics.jsonl")
    plots = []
    for name, key in (("reward.png", "reward" if r.algorithm == "grpo" else "objective/scores"),
                      ("kl.png", "kl" if r.algorithm == "grpo" else "objective/kl"),
                      ("accuracy.png", "eval/accuracy")):
        if any(key in m for m in metrics) and plot_curves(metrics, rl_dir / name, title=f"{r.algorithm}: {key}",
                                                           right=key):
            plots.append(name)
    ctx.report.add("RL", _section(result, rl_dir, plots))
    start, last = result.get("start") or {}, result.get("last") or {}
    ctx.results["rl"] = {"algorithm": r.algorithm, "model": str(rl_dir / "model"), "start": start,
                         "last": {k: v for k, v in last.items() if k.startswith(("eval/", "reward", "kl"))}}
    if "eval/accuracy" in start and "eval/accuracy" in last:
        say(f"  RL: held-out accuracy {start['eval/accuracy']:.3f} -> {last['eval/accuracy']:.3f}")


def _describe(ctx: Context) -> str:
    r = ctx.cfg.rl
    if not r.enabled:
        return "skipped (rl.enabled=false)"
    if not (ctx.results.get("sft") or {}).get("model"):
        return "skipped: no SFT model to start from"
    return (f"{r.algorithm.upper()} from the SFT model on world verifier tasks ({', '.join(r.types or ['all'])}), "
            f"{r.max_steps} steps of {r.global_batch_size} answers ({r.num_generations} per prompt)")


def _estimate(ctx: Context) -> Optional[float]:
    """0 when it will be skipped; else pretraining's time per step scaled by the rows, twice over (sampling the
    answers costs about what the update does, measured by benchmarks/bench_grpo.py): a rough bound."""
    r = ctx.cfg.rl
    if not r.enabled or not (ctx.results.get("sft") or {}).get("model"):
        return 0.0
    p = ctx.results.get("pretrain")
    if not p or not p.get("elapsed_s") or not p.get("step"):
        return None
    return 2 * p["elapsed_s"] / p["step"] * r.max_steps * r.global_batch_size / ctx.cfg.train.global_batch_size


RL_STAGE = Stage("rl", stage_rl, _describe, _estimate)
