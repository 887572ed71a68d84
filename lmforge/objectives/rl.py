"""Reinforcement learning from rewards: the formulas of PPO and GRPO, and their objectives on rollout batches.

Everything here is a pure function of tensors, aligned as :func:`lmforge.objectives.logprobs.token_logprobs` aligns
them: ``[B, T]`` over ``prompt + completion`` rows, column ``t`` describing token ``t``, and ONE mask -- the
completion's real tokens, its EOS included, nothing after it (``score_mask`` of
:func:`lmforge.eval.sampling.completion_batch`) -- shared by log-probs, KL, values, advantages and losses.

Formulas (cited where they are used):

* KL estimators of KL(π‖π_ref) from samples of π (Schulman, "Approximating KL divergence", 2020), with
  ``log r = log π_ref - log π``: k1 = ``-log r`` (unbiased, can be negative), k3 = ``(r - 1) - log r`` (unbiased,
  always >= 0: GRPO's, DeepSeekMath eq. 4).
* GAE (Schulman et al. 2016, eq. 16): ``δ_t = r_t + γ V_{t+1} - V_t``, ``Â_t = Σ_l (γλ)^l δ_{t+l}``; returns
  ``Â_t + V_t``; ``V`` past the last real token is 0.
* PPO-clip (Schulman et al. 2017, eq. 7): per token ``max(-Â ρ, -Â clip(ρ, 1-ε, 1+ε))`` with ``ρ = π/π_old``;
  value loss ``½ max((V - R)², (clip(V, V_old ± ε_v) - R)²)`` (TRL's PPOTrainer).
* GRPO (Shao et al. 2024, DeepSeekMath eq. 3): the advantage of sample i of a group is ``(r_i - mean(r)) /
  (std(r) + 1e-4)`` (``scale_rewards``: group std, batch std, or none -- Dr. GRPO, Liu et al. 2025); the token
  loss is PPO's clipped term with ε_low / ε_high (DAPO, Yu et al. 2025, "clip-higher") plus ``β·k3``.

Aggregations of the token losses ``l_it`` with mask ``m_it`` (TRL 1.16 ``GRPOTrainer._compute_loss``):

* ``grpo`` -- each sequence's token mean, averaged over sequences;
* ``bnpo`` -- the token mean of each local (micro-)batch, as TRL (so it depends on how the batch is split);
* ``dr_grpo`` -- ``Σ l m / (sequences · max_completion_length)``;
* ``dapo`` -- ``Σ l m / (tokens of the whole global batch)``: every micro-batch and rank divides by the same
  global count, which the Trainer's ``target_count`` gives up front, so accumulation and ranks do not change it.

The objectives return the loss *summed* with its count (the Trainer divides by the global count); metrics are sums
too: token metrics carry ``tok_scale`` (global count / global tokens, a batch column) and per-rollout statistics
(``stat/<name>`` columns) carry ``row_scale`` (global count / rows), so the logged value is the global token mean,
resp. the mean over rollouts, however the batch is split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.objectives.base import Objective, ObjectiveOutput
from lmforge.objectives.logprobs import hidden_logprobs, shared_prompt_logprobs, shares_prompts, token_logprobs

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k3")
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


# ---- estimators and advantages ------------------------------------------------------------------------------

def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π - log π_ref per token (Schulman 2020)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log π_ref - log π) - (log π_ref - log π) - 1 per token (Schulman 2020; DeepSeekMath eq. 4)."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - log_r - 1


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    return kl_k1(logp, ref_logp) if estimator == "k1" else kl_k3(logp, ref_logp)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the masked entries (unbiased variance, as TRL's ``masked_whiten``);
    ``shift_mean=False`` adds the mean back (rewards are whitened in scale only).  0 outside the mask."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = m.sum()
    var = ((x - mean) ** 2 * m).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over ``[B, T]`` rows whose masked tokens are contiguous (a completion).

    ``rewards`` and ``values`` are read only under ``mask`` (0 elsewhere, so ``V`` after the last token is 0);
    returns ``(advantages, returns)``, 0 outside the mask.  The loop runs backwards over the columns (T steps, each a
    ``[B]`` op), as the definition reads."""
    m = mask.to(values.dtype)
    r, v = rewards * m, values * m
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        nxt = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(last)
        delta = r[:, t] + gamma * nxt - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]  # before the completion: nothing carries into the prompt
        adv[:, t] = last
    return adv, (adv + v) * m


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's advantages of prompt-major rewards ``[P·G]`` and the std each was scaled by (``[P·G]``; the group's
    std also for ``none``, for ``frac_reward_zero_std``).  std is unbiased (torch's default, TRL's ``nanstd``)."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    if scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        std = grouped.std(dim=1).repeat_interleave(group_size)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + STD_EPS)
    return adv, std


# ---- per-token losses ---------------------------------------------------------------------------------------

def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max(-Â ρ, -Â clip(ρ, 1-ε, 1+ε)), clipped)`` per token (PPO eq. 7 as a loss); ``clipped``: the clipped
    term was the larger (TRL's ``clipfrac``)."""
    ratio = torch.exp(logp - old_logp)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.max(loss1, loss2), (loss2 > loss1)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(½ max((V - R)², (clip(V, V_old - ε, V_old + ε) - R)²), clipped)`` per token."""
    clipped_v = torch.clamp(values, old_values - clip, old_values + clip)
    l1, l2 = (values - returns) ** 2, (clipped_v - returns) ** 2
    return 0.5 * torch.max(l1, l2), (l2 > l1)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                    eps_high: float, ref_logp: torch.Tensor | None = None, beta: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GRPO's token loss ``-min(ρ Â, clip(ρ, 1-ε_low, 1+ε_high) Â) + β k3`` with sequence advantages ``[B]``;
    returns ``(loss [B, T], ρ [B, T], k3 [B, T] or None)``."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    coef = torch.exp(logp - old_logp)
    loss = -torch.min(coef * adv, torch.clamp(coef, 1 - eps_low, 1 + eps_high) * adv)
    kl = None
    if beta != 0.0 and ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        loss = loss + beta * kl
    return loss, coef, kl


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int
              ) -> tuple[torch.Tensor, int]:
    """One micro-batch's ``(loss_sum, count)`` under ``loss_type`` (module doc); ``count`` is what
    :func:`aggregation_count` gives for the same rows, so the Trainer's global division yields TRL's loss."""
    m = mask.to(per_token.dtype)
    rows = per_token.shape[0]
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum(), rows
    if loss_type == "bnpo":
        return (per_token * m).sum() / m.sum().clamp(min=1) * rows, rows
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / max_completion_length, rows
    if loss_type == "dapo":
        return (per_token * m).sum(), int(mask.sum())
    raise ValueError(f"unknown loss_type {loss_type!r}")


def aggregation_count(mask: torch.Tensor, loss_type: str) -> int:
    """The denominator of ``loss_type`` for a (global) batch: its tokens for ``dapo``, else its sequences."""
    return int(mask.sum()) if loss_type == "dapo" else int(mask.shape[0])


def add_scales(batch: dict[str, Any], count: int) -> dict[str, Any]:
    """``tok_scale`` / ``row_scale`` columns of a global batch (module doc: metrics as global means)."""
    rows, tokens = batch["score_mask"].shape[0], max(int(batch["score_mask"].sum()), 1)
    batch["tok_scale"] = torch.full((rows,), count / tokens, dtype=torch.float64)
    batch["row_scale"] = torch.full((rows,), count / max(rows, 1), dtype=torch.float64)
    return batch


def _token_sum(x: torch.Tensor, mask: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    return ((x.detach().double() * mask).sum(-1) * batch["tok_scale"]).sum()


def _row_stats(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k[5:]: (batch[k].double() * batch["row_scale"]).sum() for k in batch if k.startswith("stat/")}


class _RolloutObjective(Objective):
    """What both objectives share: a rollout batch comes collated (the rollout source builds it)."""

    def collate(self, raw: Any) -> dict[str, torch.Tensor]:
        return raw

    def input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())


class GRPOObjective(_RolloutObjective):
    """GRPO on a rollout batch: ``input_ids``, ``attention_mask``, ``score_mask``, ``old_logps`` (the policy's at
    rollout time, same alignment; absent at μ = 1, where it is the current forward's, detached), ``advantages [B]``,
    optionally ``ref_logps``; ``tok_scale``/``row_scale``; with ``group`` / ``prompt_len`` (the rollout source's) the
    forward runs each prompt once for its answers (:func:`~lmforge.objectives.logprobs.shared_prompt_logprobs`)."""

    def __init__(self, *, loss_type: str = "dapo", eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
                 temperature: float = 1.0, max_completion_length: int = 64, share_prompts: bool = True) -> None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}")
        self.share_prompts = share_prompts
        self.loss_type, self.eps_low, self.eps_high, self.beta = loss_type, eps_low, eps_high, beta
        self.temperature, self.max_completion_length = temperature, max_completion_length

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return aggregation_count(batch["score_mask"], self.loss_type)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        args = batch["input_ids"], batch["attention_mask"], batch["score_mask"]
        if self.share_prompts and "group" in batch and shares_prompts(model):  # each prompt once for its G answers
            lp = shared_prompt_logprobs(model, *args, batch["prompt_len"], batch["group"],
                                        temperature=self.temperature, entropy=True)
        else:
            lp = token_logprobs(model, *args, temperature=self.temperature, entropy=True)
        mask = lp.mask
        adv = batch["advantages"].to(lp.logprobs.dtype)
        # μ = 1: the rollout's policy is this one, old = current (TRL's shortcut: no second forward at rollout time)
        old = batch["old_logps"] if "old_logps" in batch else lp.logprobs.detach()
        per_token, coef, kl = grpo_token_loss(lp.logprobs, old, adv, self.eps_low, self.eps_high,
                                              batch.get("ref_logps"), self.beta)
        loss_sum, count = aggregate(per_token, mask, self.loss_type, self.max_completion_length)
        low = (coef < 1 - self.eps_low) & (adv[:, None] < 0)
        high = (coef > 1 + self.eps_high) & (adv[:, None] > 0)
        metrics = {"entropy": _token_sum(lp.entropy, mask, batch),
                   "clip_ratio/low_mean": _token_sum(low.float(), mask, batch),
                   "clip_ratio/high_mean": _token_sum(high.float(), mask, batch),
                   "clip_ratio/region_mean": _token_sum((low | high).float(), mask, batch),
                   **_row_stats(batch)}
        if "gen_logps" in batch and "old_logps" not in batch:  # the on-policy gap, from this very forward
            metrics["rollout/logprob_gap"] = _token_sum((lp.logprobs - batch["gen_logps"]).abs(), mask, batch)
        if kl is not None:
            metrics["kl"] = _token_sum(kl, mask, batch)
        return ObjectiveOutput(loss_sum, count, metrics)


class PPOObjective(_RolloutObjective):
    """PPO on a rollout batch: the GRPO batch's keys with token ``advantages [B, T]``, ``returns`` and ``old_values``;
    ``model(input_ids, attention_mask) -> (hidden [B, T, d], values [B, T] aligned with the tokens)`` and
    ``model.lm_head`` (:class:`lmforge.rl.policy.ActorCritic`).  Token mean over the whole global batch."""

    def __init__(self, *, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1,
                 temperature: float = 1.0) -> None:
        self.cliprange, self.cliprange_value, self.vf_coef, self.temperature = (cliprange, cliprange_value, vf_coef,
                                                                                temperature)

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["score_mask"].sum())

    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                score_mask: torch.Tensor, entropy: bool = False):
        """One forward: the policy's token log-probs (``TokenLogProbs``) and the values ``[B, T]``."""
        hidden, values = model(input_ids, attention_mask)
        lp = hidden_logprobs(hidden, model.lm_head, input_ids, attention_mask, score_mask,
                             temperature=self.temperature, entropy=entropy)
        return lp, values

    def token_logprobs_and_values(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                  score_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lp, values = self.forward(model, input_ids, attention_mask, score_mask)
        return lp.logprobs, values

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        lp, values = self.forward(model, batch["input_ids"], batch["attention_mask"], batch["score_mask"], True)
        mask = lp.mask
        m = mask.to(lp.logprobs.dtype)
        pg, pg_clipped = ppo_policy_loss(lp.logprobs, batch["old_logps"], batch["advantages"], self.cliprange)
        vf, vf_clipped = ppo_value_loss(values.float(), batch["old_values"], batch["returns"], self.cliprange_value)
        loss_sum = ((pg + self.vf_coef * vf) * m).sum()
        metrics = {"policy/approxkl_avg": _token_sum(0.5 * (lp.logprobs - batch["old_logps"]) ** 2, mask, batch),
                   "policy/clipfrac_avg": _token_sum(pg_clipped.float(), mask, batch),
                   "policy/entropy_avg": _token_sum(lp.entropy, mask, batch),
                   "loss/policy_avg": _token_sum(pg, mask, batch),
                   "loss/value_avg": _token_sum(vf, mask, batch),
                   "val/clipfrac_avg": _token_sum(vf_clipped.float(), mask, batch),
                   "val/ratio": _token_sum(torch.exp(lp.logprobs - batch["old_logps"]), mask, batch),
                   **_row_stats(batch)}
        return ObjectiveOutput(loss_sum, int(mask.sum()), metrics)


class AdaptiveKL:
    """Ziegler et al. 2019's controller (TRL's ``AdaptiveKLController``): after a batch whose per-sequence KL was
    ``kl``, ``β ← β · (1 + clip(kl / target - 1, -0.2, 0.2) · n / horizon)`` with ``n`` the batch's sequences."""

    def __init__(self, init: float, target: float, horizon: float) -> None:
        self.value, self.target, self.horizon = float(init), float(target), float(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
