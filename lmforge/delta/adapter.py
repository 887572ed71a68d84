"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021, arXiv:2005.00247).

An adapter is a small residual MLP on a sublayer's output, before that sublayer's residual add::

    h = sublayer(x)            h + up(act(down(h)))            down: [m, d], up: [d, m],  m = d / reduction

Houlsby puts one after the attention and one after the feed-forward sublayer of every block (and trains the
layer norms too, paper §2.1); Pfeiffer only after the feed-forward.  Every lmforge family ends both sublayers
with a Linear (gpt2 ``c_proj``, llama ``o_proj``/``down_proj``, bert ``attention.output.dense``/``output.dense``,
t5 ``o``/``wo``), so the adapter wraps that Linear: no model code changes, base keys unchanged, adapter keys
``<linear>.adapter_down.weight`` etc.

Identity start: ``down`` is Kaiming-uniform (nn.Linear's default) and ``up`` zero, with zero biases, so the
adapted model starts exactly at the base and ``up`` gets a useful gradient from the first step (the
initialisation He et al. 2022, arXiv:2110.04366, use for adapters, as LoRA does for its B).  Houlsby et al.'s
"near-identity" N(0, 1e-2²) for both projections makes every gradient a product of two ~1e-2 factors; in
measurements on the tiny GPT-2 (world sentiment, 200 steps) adapters so initialised stayed at chance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.delta.layer import DeltaLinear

# (attention-output Linear, feed-forward-output Linear) per family; lists follow PEFT's matching rule, a
# string is a regex (bert's FFN output 'output.dense' must not also match 'attention.output.dense').
ADAPTER_SITES = {
    "gpt2": (["attn.c_proj"], ["mlp.c_proj"]),
    "llama": (["o_proj"], ["down_proj"]),
    "bert": (r"(.*\.)?blocks\.\d+\.attention\.output\.dense", r"(.*\.)?blocks\.\d+\.output\.dense"),
    "t5": (["self_attn.o", "cross_attn.o"], ["ff.wo"]),
}


class AdapterLinear(DeltaLinear):
    """A Linear whose output passes through a bottleneck adapter: ``y + up(relu(down(y)))``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bottleneck: int = 16,
                 std: float = 0.02, device=None, dtype=None) -> None:
        if bottleneck < 1:
            raise ValueError(f"adapter bottleneck={bottleneck} must be >= 1")
        super().__init__(in_features, out_features, bias, std=std, device=device, dtype=dtype)
        self.bottleneck = int(bottleneck)
        self.adapter_down = nn.Linear(out_features, self.bottleneck, device=device, dtype=dtype)
        self.adapter_up = nn.Linear(self.bottleneck, out_features, device=device, dtype=dtype)
        self.reset_delta()

    def reset_delta(self) -> None:
        if self.adapter_down.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def fp32_units(self) -> list[nn.Module]:
        """Submodules FSDP may run in fp32 under a bf16 policy (lmforge/train/distributed.py)."""
        return [self.adapter_down, self.adapter_up]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + self.adapter_up(F.relu(self.adapter_down(y))).to(y.dtype)  # fp32 adapter on a bf16 base

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapter bottleneck={self.bottleneck}"
