"""Pairwise reward models: a scalar score per sequence, trained so the chosen answer scores above the rejected one.

Bradley-Terry (InstructGPT, Ouyang et al. 2022, eq. 1): for scores ``r_c``, ``r_r`` of the chosen and the
rejected answer, each pair's loss is

    −log σ(r_c − r_r − m)  +  λ·(r_c + r_r)²

with an optional per-pair margin ``m`` (Llama 2's margin by preference strength) and TRL's reward-centring term λ
(``center_rewards_coefficient``; Eisenstein et al. 2023), which keeps scores near zero without changing their order.
A K-way ranking of one prompt becomes all C(K, 2) of its pairs, each weighted 1/C(K, 2), so a prompt counts once
however many answers it ranks (InstructGPT §3.5): the target count of a batch is its number of prompts.

The score is the :class:`~lmforge.models.task.SequenceClassifier`'s single logit at the last real token
(``num_labels = 1``: transformers' ``…ForSequenceClassification``, what TRL loads as a reward model).

Metrics (weighted means over pairs; TRL's names): ``accuracy`` (chosen strictly above rejected), ``margin``
(r_c − r_r), ``mean_reward`` ((r_c + r_r)/2), ``rewards/chosen``, ``rewards/rejected``.  TRL's ``min_reward`` /
``max_reward`` are not sums and are left to evaluation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.objectives.base import Objective, ObjectiveOutput
from lmforge.objectives.encoding import pad_sequences


def collate_reward_pairs(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """``{chosen_ids, rejected_ids[, margin, weight]}`` (prompt included in both) -> ``chosen_*``/``rejected_*``
    tensors ``[n, T]`` right-padded, ``margin [n]`` and ``weight [n]`` (default 0 and 1).  An example may also be a
    list of such pairs (a ranking's, kept in one batch): they are flattened."""
    examples = [p for e in examples for p in (e if isinstance(e, list) else [e])]
    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        rows = [list(e[f"{side}_ids"]) for e in examples]
        batch[f"{side}_input_ids"] = pad_sequences(rows, pad_id)
        batch[f"{side}_attention_mask"] = pad_sequences([[1] * len(r) for r in rows], 0)
    batch["margin"] = torch.tensor([float(e.get("margin", 0.0)) for e in examples])
    batch["weight"] = torch.tensor([float(e.get("weight", 1.0)) for e in examples])
    return batch


class PairwiseRewardObjective(Objective):
    """Bradley-Terry loss on a scalar-headed model (module doc)."""

    def __init__(self, pad_id: int = 0, center_rewards_coefficient: float | None = None) -> None:
        if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
            raise ConfigError(f"reward.center_rewards_coefficient={center_rewards_coefficient} must be >= 0")
        self.pad_id, self.center = int(pad_id), center_rewards_coefficient

    def collate(self, raw: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_reward_pairs(raw, self.pad_id)

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(round(float(batch["weight"].sum())))

    @staticmethod
    def scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_c [n], r_r [n]): chosen and rejected rows in one forward, each padded to the wider side."""
        if getattr(model, "num_labels", 1) != 1:
            raise ConfigError(f"a reward model has one output (num_labels=1); this model has {model.num_labels}")
        width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        pad = int(getattr(model.config, "pad_token_id", None) or 0)
        ids = torch.cat([F.pad(batch[f"{s}_input_ids"], (0, width - batch[f"{s}_input_ids"].shape[1]), value=pad)
                         for s in ("chosen", "rejected")])
        attn = torch.cat([F.pad(batch[f"{s}_attention_mask"], (0, width - batch[f"{s}_attention_mask"].shape[1]))
                          for s in ("chosen", "rejected")])
        return model(ids, attention_mask=attn)[:, 0].float().chunk(2)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        chosen, rejected = self.scores(model, batch)
        w = batch["weight"].to(chosen.device)
        per_pair = -F.logsigmoid(chosen - rejected - batch["margin"].to(chosen.device))
        if self.center:
            per_pair = per_pair + self.center * (chosen + rejected) ** 2
        c, r = chosen.detach(), rejected.detach()
        metrics = {"accuracy": (w * (c > r).float()).sum(), "margin": (w * (c - r)).sum(),
                   "mean_reward": (w * (c + r) / 2).sum(), "rewards/chosen": (w * c).sum(),
                   "rewards/rejected": (w * r).sum()}
        return ObjectiveOutput((w * per_pair).sum(), int(round(float(w.sum()))), metrics)
