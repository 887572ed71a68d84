"""The registry of delta methods: one :class:`DeltaMethod` object per method, registered by the file that defines it.

``apply_delta``, ``save_delta``, ``load_delta``, ``merge_delta``, ``mergeable`` and ``DeltaConfig``'s check of
``peft.method`` only ever iterate over this registry, so a method defined anywhere -- a test file included -- works
with all of them once registered::

    class Scale(DeltaMethod):
        name = "scale"
        def apply(self, model, cfg, tokenizer):  # wrap or insert modules, set requires_grad on what trains
            ...
    register(Scale())

A method only has to ``apply``; what it trains is saved in lmforge's own format (by parameter name) and loaded
back by applying it again.  The rest is optional: PEFT's format (``peft_type`` and the ``peft_*`` methods), merging,
switching off, recognising its own modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import ModelError


class DeltaMethod:
    """One delta method.  ``cfg`` arguments are the run's ``DeltaConfig`` (the ``peft:`` section)."""

    name: str = ""
    order: int = 50
    """Where ``apply`` runs among the methods of a combination (lower first; ``lora+bitfit`` wraps before it
    unfreezes biases)."""
    counted_as: str | None = None
    """The noun the summary line counts the module paths ``apply`` returns with (``"LoRA layers"``)."""
    peft_type: str | None = None
    """PEFT's ``peft_type`` when PEFT has the method (its adapter files are then PEFT's, see ``peft_files``)."""
    train_defaults: dict[str, Any] = {}
    """``train.*`` settings (TrainerConfig keys, e.g. ``{"lr": 5e-3}``) a fine-tuning run with this method takes where
    its config and command line do not set them; empty: full fine-tuning's (a method that trains whole modules)."""

    def check(self, cfg: Any, methods: list[str]) -> None:
        """Refuse a combination of ``methods`` (all names, this one among them) this method cannot be part of."""

    def apply(self, model: nn.Module, cfg: Any, tokenizer: Any) -> list[str]:
        """Insert or wrap modules in ``model`` (already frozen) and set ``requires_grad`` on what the method trains;
        returns the module paths it adapted (counted in the summary line when ``counted_as`` is set)."""
        raise NotImplementedError

    def present(self, model: nn.Module) -> bool:
        """Whether ``model`` carries this method's modules (a second delta is refused)."""
        return False

    def owns(self, name: str) -> bool:
        """Whether parameter ``name`` is one of this method's own (not the base model's: the fingerprint skips it)."""
        return False

    def mergeable(self, model: nn.Module) -> bool:
        """Whether :meth:`merge` can give ``model`` back its original architecture."""
        return not self.present(model)

    def merge(self, model: nn.Module) -> None:
        """Bake this method's part into the base weights (in place); called only when every method is mergeable."""

    def disable(self, model: nn.Module, cfg: Any, off: bool) -> None:
        """Switch this method's part off (``off=True``: the model computes the base model) or back on."""
        raise ModelError(f"peft.method '{self.name}' changes the base weights in place; it cannot be switched off")

    # ---- PEFT's format (methods whose peft_type is set) ------------------------------------------------------
    def peft_supported(self, model: nn.Module) -> bool:
        """Whether PEFT's format can hold this method on ``model`` (else lmforge's format is written)."""
        return self.peft_type is not None

    def peft_files(self, model: nn.Module, cfg: Any, base_model: str | None
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``adapter_config.json``'s dict and ``adapter_model.safetensors``' tensors for ``model``."""
        raise NotImplementedError

    def config_from_peft(self, pc: dict[str, Any], where: str) -> Any:
        """The ``DeltaConfig`` an ``adapter_config.json`` of this ``peft_type`` stands for."""
        raise NotImplementedError

    def load_peft(self, model: nn.Module, state: dict[str, torch.Tensor], d: Path, pc: dict[str, Any]) -> None:
        """Copy PEFT's tensors ``state`` (from ``d``) into ``model``, to which this method was just applied."""
        raise NotImplementedError


_METHODS: dict[str, DeltaMethod] = {}


# ---- methods that train base weights in place (BitFit, trained modules, Houlsby's layer norms) ----------------
_ORIGINALS = "_lmforge_base_values"  # model attribute: {method name: {parameter name: its base value}}


def keep_base_values(model: nn.Module, method: str, names: list[str]) -> None:
    """Remember the base values of the parameters ``method`` is about to train in place, so that
    :func:`swap_base_values` can switch the method off.  The copies are the method's own size (what it trains)
    and are not part of the state dict; they are taken when the delta is applied, before any trained values
    are loaded, so they always hold the base model's values."""
    params = dict(model.named_parameters())  # a tied weight once, under its first name
    kept = getattr(model, _ORIGINALS, None)
    if kept is None:
        kept = {}
        object.__setattr__(model, _ORIGINALS, kept)  # a plain attribute: nn.Module would not register a dict
    # A parameter two methods train (BitFit's biases inside trained modules) is kept once, by the first, so that
    # switching both off swaps it once.
    taken = {n for values in kept.values() for n in values}
    kept[method] = {n: params[n].detach().clone() for n in dict.fromkeys(names) if n in params and n not in taken}


def swap_base_values(model: nn.Module, method: str) -> None:
    """Exchange each kept parameter's data with its kept value: called once switches the method off, again
    switches it back on.  No copy is made (the two tensors trade places); the Parameter objects, and so the
    optimizer's references to them, stay the same."""
    kept = getattr(model, _ORIGINALS, {}).get(method)
    if kept is None:
        raise ModelError(f"peft.method '{method}' trained base weights in place and their base values were not "
                         f"kept (a model saved with the delta merged in); load the base model and apply the delta "
                         f"to it to have a reference")
    with torch.no_grad():
        for name, value in kept.items():
            p = model.get_parameter(name)
            if value.device != p.device or value.dtype != p.dtype:
                value = value.to(p.device, p.dtype)
            kept[name], p.data = p.data, value


def register(method: DeltaMethod) -> DeltaMethod:
    """Add ``method`` to the registry under ``method.name`` (the name ``peft.method`` takes)."""
    if not method.name or method.name == "none" or "+" in method.name:
        raise ValueError(f"a delta method needs a name other than 'none', without '+' (got {method.name!r})")
    if method.name in _METHODS:
        raise ValueError(f"a delta method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    """Registered names, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> DeltaMethod:
    return _METHODS[name]


def registered() -> list[DeltaMethod]:
    return list(_METHODS.values())


def in_order(names: list[str]) -> list[DeltaMethod]:
    """The methods ``names`` (each once) in the order they apply."""
    return sorted((_METHODS[n] for n in dict.fromkeys(names)), key=lambda m: m.order)


def train_defaults(cfg: Any) -> tuple[dict[str, Any], str | None]:
    """The ``train.*`` defaults of ``cfg.method`` (``DeltaConfig``) and the method they are from (None: no method of
    it has any).  A combination takes the whole set of the method with the smallest default lr: a rate too large
    for one part can throw the run off, where one too small for a part only slows that part (``lora+bitfit``
    trains at LoRA's 5e-3, not BitFit's 1e-2; ``prompt+modules`` at prompt tuning's)."""
    found = [(dict(m.train_defaults), m.name) for m in in_order(cfg.methods)]
    found = [(d, name) for d, name in found if "lr" in d] or [(d, name) for d, name in found if d]
    if not found:
        return {}, None
    return min(found, key=lambda f: f[0].get("lr", float("inf")))


def peft_method(peft_type: Any) -> DeltaMethod | None:
    """The first registered method with PEFT type ``peft_type`` (``lora`` for LORA; its config says DoRA or not)."""
    return next((m for m in _METHODS.values() if m.peft_type is not None and m.peft_type == peft_type), None)
