"""What GRPO and PPO add to a rollout: the log-probs / values of its rows, then the advantages of the global batch.

Both follow :class:`lmforge.rl.rollouts.RolloutSource`'s protocol: ``score_local(rows)`` (on a rank's rows, no grad:
the policy's log-probs at the sampling temperature -- ``old_logps`` -- and the reference's / critic's), ``finish(batch,
G)`` (on the gathered global batch, the same on every rank: advantages and the per-rollout statistics logged with
TRL's names), ``scaled(batch)`` (the metric scales of :mod:`lmforge.objectives.rl`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from lmforge.objectives.logprobs import token_logprobs
from lmforge.objectives.rl import (AdaptiveKL, GRPOObjective, PPOObjective, add_scales, gae, group_advantages,
                                   kl_estimate, whiten)
from lmforge.rl.rollouts import last_token_index

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """no_grad and eval mode (dropout off, as generation ran), the mode restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def policy_scorer(model: nn.Module, temperature: float, device: torch.device, context: Callable[[], Any] = None
                  ) -> Scorer:
    """``(ids, attn, mask) -> log-probs [B, T]`` of ``model`` at ``temperature`` (inside ``context``, e.g. the delta
    disabled: the reference)."""
    def score(ids, attn, mask):
        with evaluating(model), (context() if context is not None else contextlib.nullcontext()):
            out = token_logprobs(model, ids.to(device), attn.to(device), mask.to(device), temperature=temperature)
        return out.logprobs.cpu()
    return score


def _row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


def _common_stats(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mask = batch["score_mask"]
    stats = {"stat/completions/mean_length": batch["lengths"],
             "stat/completions/clipped_ratio": batch["truncated"].float()}
    if "old_logps" in batch:
        stats["stat/rollout/logprob_gap"] = _row_mean((batch["gen_logps"] - batch["old_logps"]).abs(), mask)
    for k in [k for k in batch if k.startswith("reward/")]:
        stats[f"stat/rewards/{k[7:]}/mean"] = batch.pop(k)
    return stats


class GRPOAlgo:
    """``policy`` None: μ = 1, no log-prob pass at rollout time (the update's own forward, detached, is the old
    policy's; the on-policy gap is then measured there)."""

    def __init__(self, objective: GRPOObjective, policy: Scorer | None, reference: Scorer | None,
                 scale_rewards: str) -> None:
        self.objective, self.policy, self.reference, self.scale_rewards = objective, policy, reference, scale_rewards

    def score_local(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = rows["input_ids"], rows["attention_mask"], rows["score_mask"]
        out = {"old_logps": self.policy(*args)} if self.policy is not None else {}
        if self.reference is not None:
            out["ref_logps"] = self.reference(*args)
        return out

    def finish(self, batch: dict[str, torch.Tensor], G: int) -> dict[str, torch.Tensor]:
        adv, std = group_advantages(batch["scores"], G, self.scale_rewards)
        batch["advantages"] = adv
        batch.update(_common_stats(batch))
        batch["stat/reward"] = batch["scores"]
        batch["stat/reward_std"] = std
        batch["stat/frac_reward_zero_std"] = torch.isclose(std, torch.zeros_like(std)).float()
        return batch

    def scaled(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return add_scales(batch, self.objective.target_count(batch))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PPOAlgo:
    """Per-token rewards ``-β·KL`` plus the sequence score on its last real token, GAE, whitened advantages (TRL's
    PPOTrainer); ``kl`` fixed or :class:`AdaptiveKL` (updated after each rollout by its per-sequence KL)."""

    def __init__(self, objective: PPOObjective, model: nn.Module, reference: Scorer | None, device: torch.device, *,
                 kl: AdaptiveKL | float, kl_estimator: str, gamma: float, lam: float, whiten_rewards: bool,
                 eos_ids: list[int]) -> None:
        self.objective, self.model, self.reference, self.device = objective, model, reference, device
        self.kl, self.kl_estimator, self.gamma, self.lam = kl, kl_estimator, gamma, lam
        self.whiten_rewards, self.eos_ids = whiten_rewards, eos_ids

    @property
    def kl_coef(self) -> float:
        return self.kl.value if isinstance(self.kl, AdaptiveKL) else float(self.kl)

    def score_local(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, attn, mask = (rows[k].to(self.device) for k in ("input_ids", "attention_mask", "score_mask"))
        with evaluating(self.model):
            logps, values = self.objective.token_logprobs_and_values(self.model, ids, attn, mask)
        out = {"old_logps": logps.cpu(), "old_values": (values.float() * mask).cpu()}
        out["ref_logps"] = self.reference(ids, attn, mask) if self.reference is not None else out["old_logps"]
        return out

    def finish(self, batch: dict[str, torch.Tensor], G: int) -> dict[str, torch.Tensor]:
        mask = batch["score_mask"]
        m = mask.float()
        kl = kl_estimate(batch["old_logps"], batch["ref_logps"], self.kl_estimator) * m
        beta = self.kl_coef
        non_score = -beta * kl
        rewards = non_score.clone()
        rows = torch.arange(mask.shape[0])
        last = last_token_index(mask)
        has = mask.any(-1)
        rewards[rows[has], last[has]] += batch["scores"][has]  # the score on the last real token, never a pad
        if self.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        adv, returns = gae(rewards, batch["old_values"], mask, self.gamma, self.lam)
        batch["advantages"] = whiten(adv, mask)
        batch["returns"] = returns
        batch["token_rewards"] = rewards
        batch.update(_common_stats(batch))
        R = mask.shape[0]
        completion = batch["input_ids"] * mask
        eos = sum(((completion == e) & mask).sum(-1) for e in self.eos_ids) if self.eos_ids else torch.zeros(R)
        batch["stat/objective/kl"] = kl.sum(-1)
        batch["stat/objective/entropy"] = (-batch["old_logps"] * m).sum(-1)
        batch["stat/objective/non_score_reward"] = non_score.sum(-1)
        batch["stat/objective/rlhf_reward"] = batch["scores"] + non_score.sum(-1)
        batch["stat/objective/scores"] = batch["scores"]
        batch["stat/val/num_eos_tokens"] = eos.float() * R  # the mean over rows logs the batch's total
        batch["stat/objective/kl_coef"] = torch.full((R,), beta)
        if isinstance(self.kl, AdaptiveKL):
            self.kl.update(float(kl.sum(-1).mean()), R)
        return batch

    def scaled(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return add_scales(batch, self.objective.target_count(batch))

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.kl, AdaptiveKL):
            self.kl.value = float(state["kl_coef"])
