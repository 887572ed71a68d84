"""Trained modules (the "specification" family of delta methods: chosen layers or modules train in full):
``peft.train_modules`` names them, matched as LoRA's targets are (:func:`lmforge.delta.surgery.matches`).

What trains are base weights, changed in place: saved in lmforge's format, nothing to merge (and nothing to
switch off).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.delta.config import DeltaConfig
from lmforge.delta.registry import DeltaMethod, register
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
        return []


register(Modules())
