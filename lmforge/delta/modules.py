"""Trained modules (the "specification" family of delta methods: chosen layers or modules train in full):
``peft.train_modules`` names them, matched as LoRA's targets are (:func:`lmforge.delta.surgery.matches`).

What trains are base weights, changed in place: saved in lmforge's format, nothing to merge.  Their base values
are kept when the delta is applied (the chosen modules' size), so the method can be switched off.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.delta.config import DeltaConfig
from lmforge.delta.registry import DeltaMethod, keep_base_values, register, registered, swap_base_values
from lmforge.delta.surgery import hf_alt, matches, slot_of
from lmforge.models.slots import SIDE


class Modules(DeltaMethod):
    name = "modules"
    order = 70  # last: a side network is in place to check against

    def check(self, cfg: DeltaConfig, methods: list[str]) -> None:
        if not cfg.train_modules:
            raise ConfigError("peft.method 'modules' needs peft.train_modules (names of the modules to train)")

    def apply(self, model: nn.Module, cfg: DeltaConfig, tokenizer: Any) -> list[str]:
        hit = [p for p, _ in model.named_modules() if p and matches(p, cfg.train_modules, hf_alt(model, p))]
        if not hit:
            raise ConfigError(f"peft.train_modules={cfg.train_modules!r} matches no module of this model")
        # a side network's backbone pass runs without gradients; BERT's pooler runs after it
        inside = [p for p in hit if "pooler" not in p.split(".")]
        if slot_of(model, SIDE) is not None and inside:
            raise ConfigError(f"peft.train_modules matches '{inside[0]}', which the ladder's frozen backbone pass "
                              f"runs without gradients; with ladder only BERT's pooler (after that pass) can train")
        for p in hit:
            model.get_submodule(p).requires_grad_(True)
        others = [m for m in registered() if m is not self]  # another method's parameters switch with it
        names = [f"{p}.{n}" for p in hit for n, _ in model.get_submodule(p).named_parameters()]
        keep_base_values(model, self.name, [n for n in names if not any(m.owns(n) for m in others)])
        return []

    def disable(self, model: nn.Module, cfg: DeltaConfig, off: bool) -> None:
        swap_base_values(model, self.name)


register(Modules())
