"""Learning from preference pairs without a reward model: the DPO family, as summed per-pair losses.

For a pair (prompt x, chosen y_w, rejected y_l) let ``c = log π(y_w|x)`` and ``r = log π(y_l|x)`` be the policy's
log-probs **summed** over the completion tokens (never averaged, unless a loss says so), ``c_ref`` and ``r_ref`` the
reference's, ``|y|`` a completion's token count, and

    h = (c − c_ref) − (r − r_ref),        Δ = β·h.

Per-pair losses (``loss_types``, weighted by ``loss_weights`` and summed):

=========  ===========================================================================  ==========================
``sigmoid`` −log σ(Δ)                                                                    DPO, Rafailov et al. 2023
``cdpo``    −(1−ε) log σ(Δ) − ε log σ(−Δ)  (ε = ``label_smoothing``)                      Mitchell, "A note on DPO
                                                                                         with noisy preferences"
``robust``  (−(1−ε) log σ(Δ) + ε log σ(−Δ)) / (1 − 2ε)                                   Chowdhury et al. 2024
``hinge``   max(0, 1 − Δ)                                                                SLiC, Zhao et al. 2023
``ipo``     ((c − c_ref)/|y_w| − (r − r_ref)/|y_l| − 1/(2β))²                            IPO, Azar et al. 2023, eq.
                                                                                         17, per token as TRL (its
                                                                                         authors' normalisation)
``simpo``   −(1−ε) log σ(β(c/|y_w| − r/|y_l|) − γ) − ε log σ(−(…))  (no reference)        SimPO, Meng et al. 2024
``sft``     −c/|y_w|                                                                     RPO's NLL term, Pang et
                                                                                         al. 2024 (per pair)
=========  ===========================================================================  ==========================

Everything is a sum over pairs with the pair count as target count, so the Trainer's division by the pairs of the
whole global batch makes the loss independent of micro-batching and ranks.  (TRL's ``sft`` term is the mean over
the batch's chosen tokens instead; the two agree when the chosen answers have equal lengths.)

Metrics (TRL's names, means over pairs): ``rewards/chosen`` = β(c − c_ref), ``rewards/rejected``,
``rewards/accuracies`` (chosen reward strictly above rejected), ``rewards/margins``, ``logps/chosen``,
``logps/rejected``.  Reference-free ``simpo`` rewards are β·c/|y_w| and β·r/|y_l|, as TRL's CPO trainer logs them.

The reference is injected (this layer knows no delta methods): a frozen copy (:class:`FrozenReference`), the policy
itself inside a context that switches its delta off (:class:`DisabledReference`, no second copy), or log-probs
precomputed once into the batch (:class:`PrecomputedReference`, no reference forward in training).
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.objectives.base import Objective, ObjectiveOutput
from lmforge.objectives.encoding import pad_sequences
from lmforge.objectives.logprobs import token_logprobs

LOSS_TYPES = ("sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo", "sft")
REFERENCE_FREE = frozenset({"simpo", "sft"})
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


# -- references -------------------------------------------------------------------------------------------


class FrozenReference:
    """A separate frozen model (the Trainer places it, never trains or saves it)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.forwards = model, 0

    def modules(self) -> dict[str, nn.Module]:
        return {"reference": self.model}

    def logprobs(self, policy: nn.Module, batch: dict[str, torch.Tensor], ids, attn, score) -> torch.Tensor:
        self.forwards += 1
        with torch.no_grad():
            return token_logprobs(self.model, ids, attn, score).sums


class DisabledReference:
    """The policy itself with its delta switched off: ``disable(model)`` is a context manager (for lmforge's
    delta methods ``lambda m: delta_disabled(m, cfg)``) in which the policy computes exactly its base model."""

    def __init__(self, disable: Callable[[nn.Module], ContextManager]) -> None:
        self.disable, self.forwards = disable, 0

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def logprobs(self, policy: nn.Module, batch: dict[str, torch.Tensor], ids, attn, score) -> torch.Tensor:
        self.forwards += 1
        with torch.no_grad(), self.disable(policy):
            return token_logprobs(policy, ids, attn, score).sums


class PrecomputedReference:
    """Reference log-probs computed once before training and carried in the batch (``ref_chosen_logps``,
    ``ref_rejected_logps``): no reference forward runs while training."""

    forwards = 0

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def logprobs(self, policy: nn.Module, batch: dict[str, torch.Tensor], ids, attn, score) -> torch.Tensor:
        if "ref_chosen_logps" not in batch:
            raise ConfigError("reference log-probs were to be precomputed, but the batch carries none "
                              "(ref_chosen_logps); precompute them before training or choose another reference")
        return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(ids.device)


# -- the objective ----------------------------------------------------------------------------------------


def pair_rows(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, padded to one width: ``(input_ids, attention_mask, score_mask)`` [2n, T]."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def wide(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    # the padding id never reaches a score (masked), so any id does
    ids = torch.cat([wide(batch["chosen_input_ids"], 0), wide(batch["rejected_input_ids"], 0)])
    attn = torch.cat([wide(batch["chosen_attention_mask"], 0), wide(batch["rejected_attention_mask"], 0)])
    score = torch.cat([wide(batch["chosen_score_mask"], 0), wide(batch["rejected_score_mask"], 0)])
    return ids, attn, score


def collate_pairs(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pair examples -> a batch of ``chosen_*``/``rejected_*`` tensors ``[n, T]`` (right-padded; ``score_mask``
    on the completion).  An example is ``{prompt_ids, chosen_ids, rejected_ids}`` (TRL's layout) or whole rendered
    sequences with their masks ``{chosen_ids, chosen_mask, rejected_ids, rejected_mask}``; optionally
    ``ref_chosen_logps``/``ref_rejected_logps``."""
    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        if examples and f"{side}_mask" in examples[0]:
            rows = [list(e[f"{side}_ids"]) for e in examples]
            scored = [list(e[f"{side}_mask"]) for e in examples]
        else:
            rows = [list(e["prompt_ids"]) + list(e[f"{side}_ids"]) for e in examples]
            scored = [[0] * len(e["prompt_ids"]) + [1] * len(e[f"{side}_ids"]) for e in examples]
        batch[f"{side}_input_ids"] = pad_sequences(rows, pad_id)
        batch[f"{side}_attention_mask"] = pad_sequences([[1] * len(r) for r in rows], 0)
        batch[f"{side}_score_mask"] = pad_sequences(scored, 0)
    if examples and "ref_chosen_logps" in examples[0]:
        for side in ("chosen", "rejected"):
            batch[f"ref_{side}_logps"] = torch.tensor([float(e[f"ref_{side}_logps"]) for e in examples])
    return batch


class PreferenceObjective(Objective):
    """The DPO family over a batch of pairs (module doc); target count = pairs."""

    def __init__(self, loss_types: Sequence[str] = ("sigmoid",), loss_weights: Sequence[float] | None = None, *,
                 beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                 reference: FrozenReference | DisabledReference | PrecomputedReference | None = None,
                 pad_id: int = 0) -> None:
        self.loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
        unknown = [t for t in self.loss_types if t not in LOSS_TYPES]
        if unknown or not self.loss_types:
            raise ConfigError(f"dpo.loss_type {unknown or self.loss_types} is not one of {', '.join(LOSS_TYPES)}")
        self.loss_weights = [1.0] * len(self.loss_types) if loss_weights is None else [float(w) for w in loss_weights]
        if len(self.loss_weights) != len(self.loss_types):
            raise ConfigError(f"dpo.loss_weights has {len(self.loss_weights)} values for {len(self.loss_types)} "
                              f"loss types {self.loss_types}; give one weight per type")
        if not beta > 0:
            raise ConfigError(f"dpo.beta={beta} must be > 0")
        if not 0.0 <= label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={label_smoothing} must be in [0, 0.5)")
        if "simpo" in self.loss_types and len(set(self.loss_types) - REFERENCE_FREE):
            raise ConfigError(f"dpo.loss_type {self.loss_types}: simpo is reference-free and does not combine with "
                              f"reference-based losses")
        needs_reference = bool(set(self.loss_types) - REFERENCE_FREE)
        if needs_reference and reference is None:
            raise ConfigError(f"dpo.loss_type {self.loss_types} compares with a reference model; give one "
                              f"(dpo.reference: copy | disabled | precomputed)")
        self.beta, self.label_smoothing, self.simpo_gamma = float(beta), float(label_smoothing), float(simpo_gamma)
        self.reference = reference if needs_reference else None
        self.pad_id = int(pad_id)

    def collate(self, raw: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_pairs(raw, self.pad_id)

    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def frozen_modules(self) -> dict[str, nn.Module]:
        return self.reference.modules() if self.reference is not None else {}

    def pair_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """Policy sums, counts and reference sums, each ``(chosen [n], rejected [n])``: one concatenated forward."""
        ids, attn, score = pair_rows(batch)
        pol = token_logprobs(model, ids, attn, score)
        ref = None if self.reference is None else self.reference.logprobs(model, batch, ids, attn, score)
        return pol.sums.chunk(2), pol.counts.clamp(min=1).chunk(2), None if ref is None else ref.chunk(2)

    def per_pair(self, c, r, nc, nr, ref) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss [n], chosen reward [n], rejected reward [n]) from summed log-probs (module doc's table)."""
        beta, eps = self.beta, self.label_smoothing
        loss = torch.zeros_like(c)
        if ref is not None:
            c_ratio, r_ratio = c - ref[0], r - ref[1]
            delta = beta * (c_ratio - r_ratio)
            chosen_reward, rejected_reward = beta * c_ratio.detach(), beta * r_ratio.detach()
        else:
            chosen_reward, rejected_reward = beta * (c / nc).detach(), beta * (r / nr).detach()
        for kind, weight in zip(self.loss_types, self.loss_weights):
            if kind == "sigmoid":
                term = -F.logsigmoid(delta)
            elif kind == "cdpo":
                term = -(1 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
            elif kind == "robust":
                term = (-(1 - eps) * F.logsigmoid(delta) + eps * F.logsigmoid(-delta)) / (1 - 2 * eps)
            elif kind == "hinge":
                term = torch.relu(1 - delta)
            elif kind == "ipo":
                term = (c_ratio / nc - r_ratio / nr - 1 / (2 * beta)) ** 2
            elif kind == "simpo":
                z = beta * (c / nc - r / nr) - self.simpo_gamma
                term = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            else:  # sft
                term = -c / nc
            loss = loss + weight * term
        return loss, chosen_reward, rejected_reward

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        (c, r), (nc, nr), ref = self.pair_logps(model, batch)
        loss, chosen_reward, rejected_reward = self.per_pair(c, r, nc.to(c.dtype), nr.to(c.dtype), ref)
        metrics = {"rewards/chosen": chosen_reward.sum(), "rewards/rejected": rejected_reward.sum(),
                   "rewards/accuracies": (chosen_reward > rejected_reward).float().sum(),
                   "rewards/margins": (chosen_reward - rejected_reward).sum(),
                   "logps/chosen": c.detach().sum(), "logps/rejected": r.detach().sum()}
        return ObjectiveOutput(loss.sum(), int(c.shape[0]), metrics)
