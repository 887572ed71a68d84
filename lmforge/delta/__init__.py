"""Delta tuning: train a small set of parameters while the backbone stays frozen (see docs/ARCHITECTURE.md).

``apply_delta(model, DeltaConfig(method="lora"))`` adapts any lmforge model (or any ``nn.Module`` with Linear
layers) in place; ``save_delta`` / ``load_delta`` write and read PEFT's adapter format (LoRA, DoRA, prompt and
prefix tuning) or lmforge's own (the rest, and combinations); ``merge_delta`` bakes LoRA into plain Linear layers.

Each method is one file that registers a :class:`DeltaMethod` (:mod:`lmforge.delta.registry`); importing the file
registers it, and the imports below are the built-in methods in the order ``peft.method``'s error lists them.
A method defined elsewhere registers the same way (``register(MyMethod())``).
"""

from lmforge.delta.registry import DeltaMethod, method_names, register  # noqa: I001  (registration order below)
from lmforge.delta.lora import LoRALinear, lora_layers, lora_targets  # lora, dora
from lmforge.delta.adapter import AdapterLinear, adapter_targets  # adapter
from lmforge.delta import ladder, prefix, prompt, bitfit, modules  # noqa: F401  (they register themselves)
from lmforge.delta.apply import DeltaSummary, apply_delta, delta_disabled, merge_delta, mergeable
from lmforge.delta.config import DeltaConfig
from lmforge.delta.files import base_fingerprint, is_delta_dir, load_delta, read_delta_meta, save_delta

__all__ = ["AdapterLinear", "adapter_targets", "mergeable", "DeltaConfig", "DeltaMethod",
           "DeltaSummary", "LoRALinear", "apply_delta", "base_fingerprint", "delta_disabled", "is_delta_dir",
           "load_delta", "lora_layers", "lora_targets", "merge_delta", "method_names", "read_delta_meta", "register",
           "save_delta"]
