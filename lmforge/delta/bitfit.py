"""BitFit (Ben Zaken et al. 2022, arXiv:2106.10199): the biases train, the rest stays frozen; with
``bitfit_norms`` the norm layers' gains (LayerNorm/RMSNorm weights) train too.

What trains are base weights, changed in place: saved in lmforge's format, nothing to merge (and nothing to
switch off).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.delta.config import DeltaConfig
from lmforge.delta.registry import DeltaMethod, register
from lmforge.delta.surgery import is_norm


class BitFit(DeltaMethod):
    name = "bitfit"
    order = 60  # after the methods that add modules: their biases train too
    # BitFit moves the fewest values and needs larger steps than the weight methods (seed 0, 600 steps, the 2000-step
    # GPT-2 on world sentiment: 1e-2 -> 0.972, 2e-2 -> 0.970; benchmarks/RESULTS.md, "Per-method defaults")
    train_defaults = {"lr": 1e-2}

    def apply(self, model: nn.Module, cfg: DeltaConfig, tokenizer: Any) -> list[str]:
        n = 0
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if pname == "bias" or (cfg.bitfit_norms and is_norm(module)):
                    p.requires_grad_(True)
                    n += 1
        if n == 0:
            raise ConfigError("peft.method 'bitfit' found no bias in this model (llama and T5 have none); set "
                              "peft.bitfit_norms=true to train the norm gains, or use lora")
        return []


register(BitFit())
