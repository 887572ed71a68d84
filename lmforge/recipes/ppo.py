"""`lmforge ppo CONFIG`: PPO with a KL leash (Ziegler et al. 2019; Ouyang et al. 2022) from the SFT model.

Wiring only: answers on the generation engine, rewards (:mod:`lmforge.rl.rewards`: the reward model, verifiers,
user functions), per-token reward ``-β·KL(π‖π_ref)`` (k1, or k3) with the sequence score on the answer's last real
token, GAE (γ, λ), whitened advantages, clipped policy and value losses (:mod:`lmforge.objectives.rl`),
``ppo.num_ppo_epochs`` epochs over ``ppo.num_mini_batches`` minibatches of each batch of rollouts, all under the one
Trainer (one optimizer step per minibatch).  The value head sits on the policy's trunk (``critic: shared``) or on a
separate trainable copy of the starting model (``critic: separate``).  The KL coefficient is fixed or adaptive
(``ppo.target_kl``: Ziegler's proportional controller).  The reference is a frozen copy or, with a delta method, the
policy with its delta off.  Logs use TRL's names (``objective/kl`` is the per-sequence KL sum, averaged, etc.).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lmforge.core.config import load_config, require, split_config_arg
from lmforge.delta import DeltaConfig, delta_disabled
from lmforge.objectives.rl import KL_ESTIMATORS, AdaptiveKL, PPOObjective
from lmforge.recipes.rl_run import PromptDataConfig, RLParts, train_rl
from lmforge.recipes.sft import ChatConfig
from lmforge.rl.algos import PPOAlgo, policy_scorer
from lmforge.rl.policy import ActorCritic, separate_critic
from lmforge.rl.rewards import RewardConfig
from lmforge.rl.rollouts import RolloutConfig
from lmforge.train.distributed import DistributedConfig
from lmforge.train.run import check_run_keys
from lmforge.train.trainer import TrainerConfig


@dataclass
class PPOSection:
    kl_coef: float = 0.05
    """β of the per-token KL penalty (the adaptive controller's start)."""
    target_kl: Optional[float] = None
    """Per-sequence KL the adaptive controller aims at; None: β fixed."""
    kl_horizon: float = 10000.0
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    critic: str = "shared"
    """shared (a value head on the policy's trunk) or separate (a trainable copy of the starting model)."""
    reference: str = "auto"

    def __post_init__(self) -> None:
        require(self.kl_coef >= 0, "ppo.kl_coef", self.kl_coef, ">= 0")
        require(self.target_kl is None or self.target_kl > 0, "ppo.target_kl", self.target_kl, "> 0 (or null)")
        require(self.kl_estimator in KL_ESTIMATORS, "ppo.kl_estimator", self.kl_estimator, "k1 or k3")
        require(self.num_ppo_epochs >= 1, "ppo.num_ppo_epochs", self.num_ppo_epochs, ">= 1")
        require(self.num_mini_batches >= 1, "ppo.num_mini_batches", self.num_mini_batches, ">= 1")
        require(self.critic in ("shared", "separate"), "ppo.critic", self.critic, "shared or separate")
        require(self.reference in ("auto", "copy", "disabled"), "ppo.reference", self.reference,
                "one of auto, copy, disabled")


def ppo_train_defaults() -> TrainerConfig:
    return TrainerConfig(global_batch_size=16, lr=1e-5, warmup_steps=0, weight_decay=0.0, schedule="constant",
                         eval_every=20, ckpt_every=50, keep_last=1, log_every=1, grad_clip=1.0)


@dataclass
class PPOConfig:
    run_dir: str = "runs/ppo"
    seed: int = 0
    max_steps: int = 100
    resume: Literal["auto", "true", "false"] = "false"
    overwrite: bool = False
    model: str = "runs/sft"
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    train: TrainerConfig = field(default_factory=ppo_train_defaults)
    peft: DeltaConfig = field(default_factory=DeltaConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    ppo: PPOSection = field(default_factory=PPOSection)

    def __post_init__(self) -> None:
        check_run_keys(self)

    @property
    def reference(self) -> str:
        return self.ppo.reference


def _wrap(cfg: PPOConfig, policy) -> ActorCritic:
    critic = separate_critic(policy) if cfg.ppo.critic == "separate" else None
    return ActorCritic(policy, policy.config.d_model, critic)


def _algo(parts: RLParts) -> tuple[PPOAlgo, PPOObjective]:
    cfg, p = parts.cfg, parts.cfg.ppo
    T = cfg.rollout.temperature
    objective = PPOObjective(cliprange=p.cliprange, cliprange_value=p.cliprange_value, vf_coef=p.vf_coef,
                             temperature=T)
    if parts.reference_copy is not None:
        reference = policy_scorer(parts.reference_copy, T, parts.device)
    else:
        reference = policy_scorer(parts.policy, T, parts.device, lambda: delta_disabled(parts.policy, cfg.peft))
    kl = AdaptiveKL(p.kl_coef, p.target_kl, p.kl_horizon) if p.target_kl is not None else p.kl_coef
    algo = PPOAlgo(objective, parts.model, reference, parts.device, kl=kl, kl_estimator=p.kl_estimator,
                   gamma=p.gamma, lam=p.lam, whiten_rewards=p.whiten_rewards, eos_ids=parts.stop_ids)
    return algo, objective


def ppo(cfg: PPOConfig, progress: bool | None = None) -> dict[str, Any]:
    return train_rl(cfg, "ppo", _wrap, _algo, wants_reference=True, updates=cfg.ppo.num_ppo_epochs,
                    minibatches=cfg.ppo.num_mini_batches, progress=progress)


def run_ppo(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    config_path, overrides = split_config_arg(config_path, overrides)
    return ppo(load_config(PPOConfig, config_path, overrides))
