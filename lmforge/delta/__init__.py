"""Delta tuning: train a small set of parameters while the backbone stays frozen (see docs/ARCHITECTURE.md).

``apply_delta(model, DeltaConfig(method="lora"))`` adapts any lmforge model (or any ``nn.Module`` with Linear
layers) in place; ``save_delta`` / ``load_delta`` write and read PEFT's adapter format (LoRA, DoRA) or
lmforge's own (BitFit, trained modules); ``merge_delta`` bakes LoRA into plain Linear layers.
"""

from lmforge.delta.adapter import AdapterLinear
from lmforge.delta.apply import (DeltaSummary, adapter_targets, apply_delta, lora_layers, lora_targets, merge_delta,
                                 mergeable)
from lmforge.delta.config import DEFAULT_TARGETS, METHODS, DeltaConfig
from lmforge.delta.lora import LoRALinear
from lmforge.delta.peft_format import base_fingerprint, is_delta_dir, load_delta, read_delta_meta, save_delta

__all__ = ["AdapterLinear", "adapter_targets", "mergeable", "DEFAULT_TARGETS", "METHODS", "DeltaConfig", "DeltaSummary", "LoRALinear", "apply_delta", "base_fingerprint",
           "is_delta_dir", "load_delta", "lora_layers", "lora_targets", "merge_delta", "read_delta_meta", "save_delta"]
