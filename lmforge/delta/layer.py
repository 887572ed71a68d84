"""The common shape of a delta layer: a Linear that takes over an existing Linear's Parameters and adds a
small trainable part (LoRA's branch, an adapter), so the model's base state-dict keys never change."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.layers import Linear


class DeltaLinear(Linear):
    """Subclasses build their delta modules in ``__init__`` and initialise them in :meth:`reset_delta`; their
    forward computes the plain Linear while ``delta_on`` is False (a method's ``disable``)."""

    delta_on = True

    def reset_delta(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """The base weight as :class:`Linear` does, then the delta (``Linear.__init__`` calls this before the
        delta modules exist; they reset when they are built)."""
        super().reset_parameters()
        if self._modules:
            self.reset_delta()

    @classmethod
    def wrap(cls, base: nn.Linear, **kw) -> "DeltaLinear":
        """A delta layer around ``base``: its weight and bias Parameters are shared (not copied), the delta's own
        parameters are allocated on ``base``'s device and dtype and initialised by :meth:`reset_delta`."""
        with torch.device("meta"):
            new = cls(base.in_features, base.out_features, base.bias is not None, std=getattr(base, "std", 0.02), **kw)
        new.weight, new.bias = base.weight, base.bias
        dev, dt = base.weight.device, base.weight.dtype
        for module in new.modules():  # only the delta's (meta) parameters: to_empty would re-allocate the base too
            for pname, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:
                    setattr(module, pname, nn.Parameter(torch.empty_like(p, device=dev, dtype=dt)))
        if dev.type != "meta":
            new.reset_delta()
        new.train(base.training)
        return new
