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

The ``adapter`` method saves in lmforge's format (PEFT has no bottleneck adapters) and does not merge (the
adapter is nonlinear).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.delta.apply import ADAPTERS
from lmforge.delta.config import DeltaConfig
from lmforge.delta.layer import DeltaLinear
from lmforge.delta.registry import DeltaMethod, keep_base_values, register, swap_base_values
from lmforge.delta.surgery import family_name, head_name, hf_alt, is_norm, layer_index, linear_examples, matches, set_module
from lmforge.models.families import family_of


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
        if not self.delta_on:
            return y
        return y + self.adapter_up(F.relu(self.adapter_down(y))).to(y.dtype)  # fp32 adapter on a bf16 base

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapter bottleneck={self.bottleneck}"


# ---- the method ----------------------------------------------------------------------------------------------

def adapter_targets(model: nn.Module, cfg: DeltaConfig) -> list[str]:
    """The Linear layers ending the sublayers an adapter follows (attention and FFN for Houlsby, FFN for
    Pfeiffer), from the family's ``adapter_sites``, or ``adapter_modules`` when set."""
    family = family_of(model)
    if cfg.adapter_modules is not None:
        sites = [cfg.adapter_modules]
    elif family and family.adapter_sites:
        attn, ffn = family.adapter_sites
        sites = [attn, ffn] if cfg.adapter_type == "houlsby" else [ffn]
    else:
        raise ConfigError(f"peft.adapter_modules is required for adapters on a model of family "
                          f"{family_name(model)!r}: name the Linear layers whose outputs the adapters follow")
    found = []
    for path, module in model.named_modules():
        if path and isinstance(module, nn.Linear) and not path.endswith("lm_head") and path != head_name(model) \
                and (cfg.layers is None or layer_index(path) in cfg.layers) \
                and any(matches(path, s, hf_alt(model, path)) for s in sites):
            found.append(path)
    if not found:
        raise ConfigError(f"peft: no Linear layer for adapters matches {sites!r}; Linear layers are named like "
                          f"{linear_examples(model)}")
    taken = [p for p in found if isinstance(model.get_submodule(p), DeltaLinear)]
    if taken:
        raise ConfigError(f"peft: {taken[:2]} already carry a LoRA layer; give adapter other layers "
                          f"(peft.adapter_modules / peft.target_modules)")
    return found


def _adapters(model: nn.Module) -> list[AdapterLinear]:
    return [m for m in model.modules() if isinstance(m, AdapterLinear)]


class Adapter(DeltaMethod):
    """``adapter``: Houlsby (attention and FFN, norms train) or Pfeiffer (FFN) bottleneck adapters."""

    name = "adapter"
    order = 50  # after LoRA, whose layers it refuses to wrap again
    counted_as = ADAPTERS
    # both types (benchmarks/RESULTS.md, "Per-method defaults"; world sentiment, 600 steps): on the 2000-step GPT-2
    # Houlsby 5e-3 -> 0.991 (3 seeds), Pfeiffer 5e-3 -> 0.964 and 1e-2 -> 0.968 (seed 0); on the 400-step pipeline GPT-2
    # Pfeiffer 5e-3 -> 0.795, 1e-2 -> 0.691 (3 seeds each)
    train_defaults = {"lr": 5e-3}

    def apply(self, model: nn.Module, cfg: DeltaConfig, tokenizer: Any) -> list[str]:
        adapters = adapter_targets(model, cfg)
        d_model = model.get_submodule(adapters[0]).out_features
        size = cfg.adapter_size or max(1, d_model // cfg.reduction_factor)
        for path in adapters:
            layer = AdapterLinear.wrap(model.get_submodule(path), bottleneck=size)
            set_module(model, path, layer)
            layer.adapter_down.requires_grad_(True)
            layer.adapter_up.requires_grad_(True)
        if cfg.adapter_type == "houlsby":  # Houlsby et al. §2.1: the layer norms are trained as well
            norms = [path for path, module in model.named_modules() if is_norm(module)]
            for path in norms:
                model.get_submodule(path).requires_grad_(True)
            keep_base_values(model, self.name, [f"{path}.{n}" for path in norms
                                                for n, _ in model.get_submodule(path).named_parameters()])
        return adapters

    def present(self, model: nn.Module) -> bool:
        return bool(_adapters(model))

    def owns(self, name: str) -> bool:
        return ".adapter_" in name

    def disable(self, model: nn.Module, cfg: DeltaConfig, off: bool) -> None:
        if cfg.adapter_type == "houlsby":  # the layer norms' kept base values trade places with the trained ones
            swap_base_values(model, self.name)
        for layer in _adapters(model):
            layer.delta_on = not off


register(Adapter())
