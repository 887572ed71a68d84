"""Apply, merge and switch off delta methods: every registered method (:mod:`lmforge.delta.registry`) the same way.

:func:`apply_delta` freezes the model, then lets each method of ``DeltaConfig.methods`` insert or wrap modules
and unfreeze what it trains, in the methods' ``order``; the task head (``classifier``/``score``) trains unless
``train_head`` is off.  The built-in methods, one file each: ``lora`` / ``dora`` (:mod:`lmforge.delta.lora`),
``adapter`` (:mod:`lmforge.delta.adapter`), ``ladder`` (:mod:`lmforge.delta.ladder`), ``prefix``
(:mod:`lmforge.delta.prefix`), ``prompt`` (:mod:`lmforge.delta.prompt`), ``bitfit`` (:mod:`lmforge.delta.bitfit`),
``modules`` (:mod:`lmforge.delta.modules`).

It works on any ``nn.Module`` with ``nn.Linear`` layers for the methods that wrap layers by name
(:mod:`lmforge.delta.surgery`); the slot methods (prompt, prefix, ladder) need an lmforge backbone.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.delta.config import DeltaConfig
from lmforge.delta.registry import in_order, registered
from lmforge.delta.surgery import head_name

LORA_LAYERS, ADAPTERS = "LoRA layers", "adapters"  # the nouns lora/dora and adapter count their layers with


@dataclass
class DeltaSummary:
    methods: list[str]
    trainable: int
    total: int
    adapted: dict[str, list[str]] = field(default_factory=dict)
    """Module paths the methods adapted, by the noun the summary line counts them with (``counted_as``)."""

    @property
    def targets(self) -> list[str]:
        """The LoRA/DoRA layers."""
        return self.adapted.get(LORA_LAYERS, [])

    @property
    def adapters(self) -> list[str]:
        """The bottleneck adapters."""
        return self.adapted.get(ADAPTERS, [])

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def line(self) -> str:
        return (f"delta {'+'.join(self.methods)}: {self.trainable:,} trainable of {self.total:,} parameters "
                f"({self.percent:.3f}%)" + "".join(f", {len(paths)} {noun}" for noun, paths in self.adapted.items()
                                                   if paths))


def apply_delta(model: nn.Module, cfg: DeltaConfig, tokenizer: Any = None) -> DeltaSummary | None:
    """Freeze ``model`` and add/unfreeze what ``cfg`` names (in place); None when no method is set.
    ``tokenizer``: needed only for a prompt or prefix initialised from text."""
    names = cfg.methods
    if not names:
        return None
    if any(m.present(model) for m in registered()):
        raise ConfigError("this model already carries a delta (LoRA/adapter layers, a prompt, prefix or ladder); merge it "
                          "(merge_delta) or start from the base model before applying another")
    model.requires_grad_(False)
    adapted: dict[str, list[str]] = {}
    for method in in_order(names):
        paths = method.apply(model, cfg, tokenizer)
        if method.counted_as and paths:
            adapted.setdefault(method.counted_as, []).extend(paths)
    head = head_name(model)
    if head and cfg.train_head:
        getattr(model, head).requires_grad_(True)
    params = {id(p): p for p in model.parameters()}.values()
    return DeltaSummary(names, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params),
                        adapted)


def mergeable(model: nn.Module) -> bool:
    """True when :func:`merge_delta` can give back the original architecture (no adapters: they are nonlinear;
    no soft prompt, prefix or side network: they are extra inputs or modules, not weight changes)."""
    return all(m.mergeable(model) for m in registered())


def merge_delta(model: nn.Module) -> nn.Module:
    """Bake every method's part into the base weights (in place; LoRA/DoRA layers become plain Linears): the model
    then has its original structure and saves as an ordinary checkpoint.  BitFit / trained modules already live in
    the base weights.  Adapters, prompts, prefixes and ladders cannot be merged (a ModelError)."""
    if not mergeable(model):
        raise ModelError("bottleneck adapters, soft prompts, prefixes and ladders cannot be merged into the base weights; load the base "
                         "and apply the delta with lmforge (load_delta) instead")
    for method in registered():
        method.merge(model)
    object.__setattr__(model, _MERGED, True)  # delta_disabled refuses it: the base is gone from the weights
    return model


_MERGED = "_lmforge_delta_merged"


@contextmanager
def delta_disabled(model: nn.Module, cfg: DeltaConfig) -> Iterator[nn.Module]:
    """``model`` computing its base model inside the block (e.g. the reference of a preference loss), the delta
    of ``cfg`` switched back on after it, and dropout off inside it (``eval()``; the training mode is restored).
    Additive deltas are switched off; what a method trains in place (BitFit, trained modules, Houlsby's layer
    norms) trades places with the base values kept when it was applied.  No weight is copied.  A model whose
    delta was merged into its weights has no base left: a ModelError."""
    if getattr(model, _MERGED, False):
        raise ModelError("this model's delta was merged into its weights, so it cannot be switched off; load the "
                         "base model and apply the delta (load_delta) to have the base as a reference")
    done = []
    was_training = model.training
    model.eval()
    try:
        for method in in_order(cfg.methods):
            method.disable(model, cfg, True)
            done.append(method)
        yield model
    finally:
        for method in reversed(done):
            method.disable(model, cfg, False)
        model.train(was_training)
