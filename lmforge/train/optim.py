"""AdamW with weight-decay groups.

Which parameters decay
----------------------
We follow nanoGPT's rule: **every parameter with two or more dimensions decays, every parameter with
fewer does not.**  So matrices (attention/MLP projections, embeddings, a tied LM head, LoRA ``A``/``B``)
decay; biases, LayerNorm/RMSNorm gains and other vectors/scalars do not.

Why by shape and not by name: it needs no per-family list of module names, it holds for delta modules
added later, and it matches the usual intent — decay pulls *weights that multiply activations* towards
zero, while shrinking a norm gain or a bias towards zero is a bias of its own, not regularisation.
Embeddings are matrices and decay too (as in nanoGPT and GPT-2-style training); a tied embedding/LM-head
weight is one parameter and is listed once.

Only parameters with ``requires_grad`` are optimised (frozen bases in delta tuning cost no optimizer
state).  The fused AdamW kernel is used where PyTorch has one for the parameters' device (CUDA, and CPU
since PyTorch 2.4, where it is several times faster than the alternatives); otherwise PyTorch's default
implementation for the device (multi-tensor ``foreach`` on accelerators, a per-tensor loop on CPU).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from lmforge.core.errors import ConfigError


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decay group (ndim >= 2) and a no-decay group (ndim < 2).

    Groups hold ``(name, parameter)`` pairs, so ``torch.optim`` records ``param_names`` in each group
    (and in the optimizer's state dict).  Empty groups are left out; a shared (tied) parameter is listed once.
    """
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] | list[float] = (0.9, 0.95), eps: float = 1e-8,
                    fused: str | bool = "auto") -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters with the decay/no-decay split above.

    ``fused``: ``"auto"`` (fused where the device has the kernel, else PyTorch's default), ``"true"``/``True``
    (fused; fails if the device has no fused kernel) or ``"false"``/``False`` (PyTorch's default).
    """
    groups = param_groups(model.named_parameters(), weight_decay)
    if not groups:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters (every parameter has "
                          f"requires_grad=False); unfreeze some or apply a delta method")
    if len(betas) != 2:
        raise ConfigError(f"train.betas must be two numbers, e.g. [0.9, 0.95]; got {list(betas)}")
    if isinstance(fused, str):
        fused = fused.lower()
    if fused not in ("auto", "true", "false", True, False):
        raise ConfigError(f"train.fused_adamw must be auto, true or false; got {fused!r}")
    kwargs: dict[str, Any] = {"lr": lr, "betas": (float(betas[0]), float(betas[1])), "eps": eps}
    if fused not in (False, "false"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError as e:  # no fused kernel for this device/dtype
            if fused in (True, "true"):
                device = groups[0]["params"][0][1].device
                raise ConfigError(f"train.fused_adamw=true is not supported for parameters on {device} ({e}); "
                                  f"use train.fused_adamw=auto") from None
    return torch.optim.AdamW(groups, **kwargs)
