"""The ``peft:`` section of a fine-tuning config: which delta method(s), on which modules, with what sizes.

``method`` names registered delta methods (:mod:`lmforge.delta.registry`); each method refuses the combinations
it cannot be part of (:meth:`DeltaMethod.check`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from lmforge.core.errors import ConfigError
from lmforge.delta.registry import in_order, method_names


@dataclass
class DeltaConfig:
    method: str = "none"
    """none | lora | dora | adapter | ladder | prefix | prompt | bitfit | modules, or several joined by '+' (e.g.
    adapter+bitfit; ladder stands alone, or with modules outside the frozen pass: BERT's pooler)."""
    target_modules: Optional[Union[list[str], str]] = None
    """LoRA/DoRA targets: module names matched as PEFT does (a list: the full path or its last parts equal an
    entry, e.g. 'c_attn' or 'attn.c_attn'; a string: a regex the whole path matches, tried on lmforge's and
    on transformers' path).  None: PEFT's default for the family (gpt2 c_attn; llama q_proj, v_proj; bert
    query, value; t5 q, v)."""
    layers: Optional[list[int]] = None
    """Only these block indices (None: all)."""
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r (rsLoRA: alpha / sqrt(r))."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)."""
    adapter_type: Literal["houlsby", "pfeiffer"] = "houlsby"
    """houlsby: an adapter after attention and after the feed-forward of every block (norms train too, as in
    the paper); pfeiffer: after the feed-forward only."""
    reduction_factor: int = 16
    """Adapter bottleneck = d_model / reduction_factor (rounded down, at least 1)."""
    adapter_modules: Optional[Union[list[str], str]] = None
    """Adapters: the Linear layers whose outputs they follow (matched like target_modules).  None: the
    family's attention-output and FFN-output layers (gpt2 attn.c_proj/mlp.c_proj, llama o_proj/down_proj, bert
    attention.output.dense/output.dense, t5 o/wo)."""
    adapter_size: Optional[int] = None
    """Adapter bottleneck size; overrides reduction_factor."""
    num_virtual_tokens: int = 20
    """Prompt and prefix tuning: number of soft-prompt vectors / prefix positions (PEFT's name)."""
    prompt_init: Literal["vocab", "text", "random"] = "vocab"
    """Prompt and prefix tuning's start: sampled vocabulary tokens, the tokens of prompt_init_text, or random.
    A prompt starts as those tokens' embeddings, a prefix as the frozen model's keys/values for them."""
    prompt_init_text: Optional[str] = None
    """With prompt_init='text': the text whose tokens start the prompt / prefix."""
    prefix_projection: bool = False
    """Prefix tuning through the reparameterisation MLP (embedding -> Linear -> tanh -> Linear), folded into plain
    prefixes at save."""
    encoder_hidden_size: Optional[int] = None
    """Width of the prefix MLP's hidden layer (PEFT's name); None: d_model."""
    ladder_reduction: int = 8
    """Ladder side tuning: the side network is this many times narrower than the backbone (the paper's r)."""
    bitfit_norms: bool = False
    """BitFit also trains the norm layers' weights (LayerNorm/RMSNorm gains)."""
    train_modules: list[str] = field(default_factory=list)
    """'modules' method: module names/patterns (matched like target_modules) trained in full."""
    train_head: bool = True
    """Train the task head (classifier/score) with the delta; it is saved with it."""

    @property
    def methods(self) -> list[str]:
        parts = [p.strip() for p in str(self.method).split("+") if p.strip()]
        valid = ["none", *method_names()]
        for p in parts:
            if p not in valid:
                raise ConfigError(f"peft.method: '{p}' is not a delta method; valid: {', '.join(valid)} "
                                  f"(combine with '+', e.g. lora+bitfit)")
        if "none" in parts and len(parts) > 1:
            raise ConfigError(f"peft.method='{self.method}' combines 'none' with a method; drop 'none'")
        for method in in_order([p for p in parts if p != "none"]):
            method.check(self, parts)
        if self.reduction_factor < 1 or (self.adapter_size is not None and self.adapter_size < 1):
            raise ConfigError(f"peft.reduction_factor={self.reduction_factor} / peft.adapter_size="
                              f"{self.adapter_size} must be >= 1")
        if self.r < 1:
            raise ConfigError(f"peft.r={self.r} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"peft.dropout={self.dropout} must be in [0, 1)")
        return [p for p in parts if p != "none"]

    @property
    def active(self) -> bool:
        return bool(self.methods)
