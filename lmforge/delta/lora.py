"""LoRA (Hu et al. 2021, arXiv:2106.09685) and DoRA (Liu et al. 2024, arXiv:2402.09353) on a Linear layer.

LoRA learns a low-rank update of a frozen weight ``W [out, in]``::

    y = x Wᵀ + b + s · B(A(dropout(x)))        A: [r, in],  B: [out, r],  s = alpha / r  (rsLoRA: alpha / √r)

``A`` starts Kaiming-uniform and ``B`` at zero, so training starts exactly at the base model.  Dropout acts
on the LoRA branch's input only.  rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by ``alpha / √r`` so
larger ranks keep learning.

DoRA splits the adapted weight into a magnitude ``m [out]`` and a direction::

    W' = W + s · B A          y = (m / ‖W'‖_row) ⊙ (x W'ᵀ) + b

with the row norm detached from the graph (paper §4.3, as PEFT does), ``m`` initialised to ``‖W‖_row``.

The layer *replaces* the Linear it adapts and keeps that Linear's ``weight``/``bias`` Parameters under their
own names, so a model's state-dict keys for the base weights do not change and the new ones read like
PEFT's (``...c_attn.lora_A.weight``, ``...c_attn.lora_magnitude_vector``).  ``merge()`` folds the update into
``weight`` (output unchanged within fp32 rounding), ``unmerge()`` takes it out again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.delta.layer import DeltaLinear
from lmforge.models.layers import Linear


class LoRALinear(DeltaLinear):
    """A Linear with a LoRA (or DoRA) branch; built from the Linear it replaces with ``LoRALinear.wrap(linear, r=...)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, rslora: bool = False, dora: bool = False, std: float = 0.02,
                 device=None, dtype=None) -> None:
        if r < 1:
            raise ValueError(f"LoRA rank r={r} must be >= 1")
        super().__init__(in_features, out_features, bias, std=std, device=device, dtype=dtype)
        self.r, self.alpha, self.rslora, self.dora = int(r), float(alpha), bool(rslora), bool(dora)
        self.scaling = self.alpha / (math.sqrt(self.r) if self.rslora else self.r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, out_features, bias=False, device=device, dtype=dtype)
        if self.dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.merged = False
        self._merge_scale: torch.Tensor | None = None  # DoRA: m / ‖W'‖ at merge time, to unmerge exactly
        self.reset_delta()

    # ---- initialisation ---------------------------------------------------------------------------
    def reset_delta(self) -> None:
        """A ~ Kaiming-uniform(a=√5) (U(±1/√in), nn.Linear's default), B = 0; DoRA's m = ‖W‖_row."""
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.dora:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self._adapted_weight().norm(dim=1))

    # ---- the math ---------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``s · B A``: the update in ``weight``'s ``[out, in]`` layout."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _adapted_weight(self) -> torch.Tensor:
        w = self.weight if not self.merged else self._unmerged_weight()
        return w + self.delta_weight()

    def _unmerged_weight(self) -> torch.Tensor:
        if not self.dora:
            return self.weight - self.delta_weight()
        return self.weight / self._merge_scale[:, None] - self.delta_weight()

    def fp32_units(self) -> list[nn.Module]:
        """Submodules FSDP may run in fp32 under a bf16 policy (lmforge/train/distributed.py): A and B, which only
        their own forward touches — not under DoRA, whose norm reads their weights directly."""
        return [] if self.dora else [self.lora_A, self.lora_B]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return super().forward(x)
        dx = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(dx)) * self.scaling
        if not self.dora:
            y = super().forward(x)
            return y + lora.to(y.dtype)  # an fp32 delta on a bf16 base adds in the base's dtype
        # DoRA: (m / ‖W + sBA‖) ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b, the norm detached (paper §4.3).  Written as
        # base(x) + (scale - 1) ⊙ dropout(x) Wᵀ + scale ⊙ lora so that, without dropout, it is exactly that,
        # and with dropout the dropped input feeds only the learned part (as PEFT does).
        with torch.no_grad():  # detached (no graph: nothing saved for a backward that never uses it)
            norm = self._adapted_weight().norm(dim=1)
        scale = self.lora_magnitude_vector / norm
        return super().forward(x) + (scale - 1) * F.linear(dx, self.weight) + scale * lora

    # ---- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight``: the forward then costs one matmul, output unchanged."""
        if self.merged:
            return
        if self.dora:
            adapted = self.weight + self.delta_weight()
            self._merge_scale = self.lora_magnitude_vector / adapted.norm(dim=1)
            self.weight.copy_(adapted * self._merge_scale[:, None])
        else:
            self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``weight`` again (exact up to fp32 rounding)."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight())
        self.merged, self._merge_scale = False, None

    def to_linear(self) -> Linear:
        """A plain Linear holding the merged weight (the LoRA branch baked in)."""
        self.merge()
        out = Linear.__new__(Linear)
        nn.Module.__init__(out)
        out.in_features, out.out_features, out.std = self.in_features, self.out_features, self.std
        out.weight, out.bias = self.weight, self.bias
        out.train(self.training)
        return out

    def extra_repr(self) -> str:
        kind = "DoRA" if self.dora else "LoRA"
        return (f"{super().extra_repr()}, {kind} r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"
                f"{', merged' if self.merged else ''}")
