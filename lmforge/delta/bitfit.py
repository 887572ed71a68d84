"""BitFit (Ben Zaken et al. 2022, arXiv:2106.10199): the biases train, the rest stays frozen; with
``bitfit_norms`` the norm layers' gains (LayerNorm/RMSNorm weights) train too.

What trains are base weights, changed in place: saved in lmforge's format, nothing to merge.  The base values of
what trains are kept when the delta is applied (the method's own size), so the method can be switched off.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.delta.config import DeltaConfig
from lmforge.delta.registry import DeltaMethod, keep_base_values, register, swap_base_values
from lmforge.delta.surgery import is_norm


class BitFit(DeltaMethod):
    name = "bitfit"
    order = 60  # after the methods that add modules: their biases train too
    # BitFit moves the fewest values and needs larger steps than the weight methods (seed 0, 600 steps, the 2000-step
    # GPT-2 on world sentiment: 1e-2 -> 0.972, 2e-2 -> 0.970; benchmarks/RESULTS.md, "Per-method defaults")
    train_defaults = {"lr": 1e-2}

    def apply(self, model: nn.Module, cfg: DeltaConfig, tokenizer: Any) -> list[str]:
        trained = []
        for path, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if pname == "bias" or (cfg.bitfit_norms and is_norm(module)):
                    p.requires_grad_(True)
                    trained.append(f"{path}.{pname}" if path else pname)
        keep_base_values(model, self.name, trained)
        if not trained:
            raise ConfigError("peft.method 'bitfit' found no bias in this model (llama and T5 have none); set "
                              "peft.bitfit_norms=true to train the norm gains, or use lora")
        return []

    def disable(self, model: nn.Module, cfg: DeltaConfig, off: bool) -> None:
        swap_base_values(model, self.name)  # the kept base biases (and gains) trade places with the trained ones


register(BitFit())
