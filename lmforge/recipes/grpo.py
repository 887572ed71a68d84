"""`lmforge grpo CONFIG`: Group Relative Policy Optimization (DeepSeekMath, Shao et al. 2024) from the SFT model.

Wiring only: G answers per prompt on the generation engine (:mod:`lmforge.rl.rollouts`), the rewards
(:mod:`lmforge.rl.rewards`: the world's verifiers by default), advantages relative to the group and the clipped loss
of :mod:`lmforge.objectives.rl` under the one Trainer (accumulation, checkpoints, exact resume, DDP), full
fine-tuning or any delta method.  ``grpo.beta = 0`` (TRL's default) loads no reference; with ``beta > 0`` the
reference is a frozen copy (``reference: copy``) or the policy with its delta off (``disabled``, a delta's default).
``grpo.num_iterations`` (μ) updates per batch of rollouts: from the second on the ratio moves and clipping matters.
Logs use TRL's names: ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``kl``, ``entropy``, ``clip_ratio/*``,
``completions/mean_length``, and the time split ``time/generate_s``, ``time/score_s``, ``time/update_s``.  A loss of
0 is normal in GRPO at μ = 1: the advantages of a group sum to zero, so the loss value is ~0 while its gradient is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lmforge.core.config import load_config, require, split_config_arg
from lmforge.core.errors import ConfigError
from lmforge.delta import DeltaConfig, delta_disabled
from lmforge.objectives.rl import LOSS_TYPES, SCALE_REWARDS, GRPOObjective
from lmforge.recipes.rl_run import PromptDataConfig, RLParts, train_rl
from lmforge.recipes.sft import ChatConfig
from lmforge.rl.algos import GRPOAlgo, policy_scorer
from lmforge.rl.rewards import RewardConfig
from lmforge.rl.rollouts import RolloutConfig
from lmforge.train.distributed import DistributedConfig
from lmforge.train.run import check_run_keys
from lmforge.train.trainer import TrainerConfig


@dataclass
class GRPOSection:
    loss_type: str = "dapo"
    """grpo, bnpo, dr_grpo, dapo (TRL 1.16's default): how token losses are averaged (lmforge/objectives/rl.py)."""
    scale_rewards: str = "group"
    """group (std of the group), batch (std of the whole batch), none (Dr. GRPO)."""
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    """Upper clip (DAPO's clip-higher); None: epsilon."""
    beta: float = 0.0
    """k3 KL coefficient; 0 loads no reference."""
    num_iterations: int = 1
    """μ: updates on each batch of rollouts."""
    reference: str = "auto"

    def __post_init__(self) -> None:
        require(self.loss_type in LOSS_TYPES, "grpo.loss_type", self.loss_type, f"one of {', '.join(LOSS_TYPES)}")
        require(self.scale_rewards in SCALE_REWARDS, "grpo.scale_rewards", self.scale_rewards,
                f"one of {', '.join(SCALE_REWARDS)}")
        require(self.num_iterations >= 1, "grpo.num_iterations", self.num_iterations, ">= 1")
        require(self.beta >= 0, "grpo.beta", self.beta, ">= 0")
        require(self.reference in ("auto", "copy", "disabled"), "grpo.reference", self.reference,
                "one of auto, copy, disabled")


def grpo_train_defaults() -> TrainerConfig:
    return TrainerConfig(global_batch_size=16, lr=5e-6, warmup_steps=0, weight_decay=0.0, schedule="constant",
                         eval_every=20, ckpt_every=50, keep_last=1, log_every=1, grad_clip=1.0)


@dataclass
class GRPOConfig:
    run_dir: str = "runs/grpo"
    seed: int = 0
    max_steps: int = 100
    resume: Literal["auto", "true", "false"] = "false"
    overwrite: bool = False
    model: str = "runs/sft"
    """A decoder model dir or run dir (its ``model/``): usually the SFT model."""
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    train: TrainerConfig = field(default_factory=grpo_train_defaults)
    peft: DeltaConfig = field(default_factory=DeltaConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)

    def __post_init__(self) -> None:
        check_run_keys(self)
        if self.rollout.num_generations < 2:
            raise ConfigError(f"config key 'rollout.num_generations': {self.rollout.num_generations} must be >= 2 "
                              f"for GRPO (an advantage is a reward relative to its group); use 4 or more")

    @property
    def reference(self) -> str:
        return self.grpo.reference


def _algo(parts: RLParts) -> tuple[GRPOAlgo, GRPOObjective]:
    cfg, g = parts.cfg, parts.cfg.grpo
    T = cfg.rollout.temperature
    objective = GRPOObjective(loss_type=g.loss_type, eps_low=g.epsilon,
                              eps_high=g.epsilon if g.epsilon_high is None else g.epsilon_high, beta=g.beta,
                              temperature=T, max_completion_length=cfg.rollout.max_new_tokens)
    reference = None
    if g.beta > 0:
        if parts.reference_copy is not None:
            reference = policy_scorer(parts.reference_copy, T, parts.device)
        else:
            reference = policy_scorer(parts.policy, T, parts.device, lambda: delta_disabled(parts.policy, cfg.peft))
    policy = policy_scorer(parts.policy, T, parts.device) if g.num_iterations > 1 else None
    algo = GRPOAlgo(objective, policy, reference, g.scale_rewards)
    return algo, objective


def grpo(cfg: GRPOConfig, progress: bool | None = None) -> dict[str, Any]:
    return train_rl(cfg, "grpo", lambda c, policy: policy, _algo, wants_reference=cfg.grpo.beta > 0,
                    updates=cfg.grpo.num_iterations, minibatches=1, progress=progress)


def run_grpo(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    config_path, overrides = split_config_arg(config_path, overrides)
    return grpo(load_config(GRPOConfig, config_path, overrides))
