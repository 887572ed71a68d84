"""PPO's model: the policy and a value head, on the policy's own trunk or on a separate critic trunk.

``ActorCritic(input_ids, attention_mask) -> (policy hidden [B, T, d], values [B, T])``.  Values are aligned with the
tokens as log-probs are: column ``t`` is the value of the state *before* token ``t`` (the head on the hidden state
at ``t - 1``, TRL's ``value[:, context_length - 1 : -1]``); column 0 is 0.  ``lm_head`` is the policy's, so
:func:`lmforge.objectives.logprobs.hidden_logprobs` scores the policy from the same forward.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ActorCritic(nn.Module):
    def __init__(self, policy: nn.Module, d_model: int, critic: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.critic = critic
        if critic is not None and hasattr(critic, "lm_head"):
            critic.lm_head.requires_grad_(False)  # the critic's trunk trains, its LM head is never read
        self.value_head = nn.Linear(d_model, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the rewards' own
        nn.init.zeros_(self.value_head.bias)

    @property
    def lm_head(self) -> nn.Module:
        return self.policy.lm_head

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.policy(input_ids, attention_mask=attention_mask)
        trunk = hidden if self.critic is None else self.critic(input_ids, attention_mask=attention_mask)
        v = self.value_head(trunk).squeeze(-1)  # [B, T]: value of the state after token t
        values = torch.zeros_like(v)
        values[:, 1:] = v[:, :-1]
        return hidden, values


def separate_critic(model: nn.Module) -> nn.Module:
    """A trainable copy of the starting model's trunk (before any delta is applied)."""
    critic = copy.deepcopy(model)
    critic.requires_grad_(True)
    return critic
