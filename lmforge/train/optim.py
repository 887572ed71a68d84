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

import fnmatch
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from lmforge.core.errors import ConfigError


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` (fnmatch) matches the parameter ``name`` itself or a module path inside it:
    ``classifier`` matches ``classifier.weight`` and ``model.classifier.bias``; ``*.bias`` every bias."""
    return any(fnmatch.fnmatchcase(name, p) for p in (pattern, f"{pattern}.*", f"*.{pattern}", f"*.{pattern}.*"))


def _some(names: list[str]) -> str:
    """The first and last three names, for an error that says what exists."""
    return ", ".join(names[:3] + names[-3:]) or "(none)"


def freeze_parameters(model: nn.Module, patterns: Iterable[str]) -> None:
    """``requires_grad_(False)`` on every parameter of ``model`` that a pattern matches (``train.freeze``, patterns
    as in :func:`_matches`).  A pattern that matches no parameter is a ConfigError naming some that exist."""
    named = list(model.named_parameters())
    for pattern in patterns:
        hit = [(n, p) for n, p in named if _matches(n, pattern)]
        if not hit:
            raise ConfigError(f"train.freeze: pattern {pattern!r} matches no parameter; parameters include "
                              f"{_some([n for n, _ in named])}")
        for _, p in hit:
            p.requires_grad_(False)


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 param_lr: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Split trainable parameters into a decay group (ndim >= 2) and a no-decay group (ndim < 2).

    ``param_lr`` (``train.param_lr``): ``{pattern: lr}``; parameters matching a pattern (the first that matches,
    see :func:`_matches`) get their own groups with that learning rate (the schedule scales it like the base lr),
    e.g. a task head that wants a lower rate than the delta it is trained with.  A pattern that matches no
    trainable parameter is a ConfigError naming some that exist.
    Groups hold ``(name, parameter)`` pairs, so ``torch.optim`` records ``param_names`` in each group
    (and in the optimizer's state dict).  Empty groups are left out; a shared (tied) parameter is listed once.
    """
    param_lr = dict(param_lr or {})
    buckets: dict[tuple[bool, str | None], list[tuple[str, nn.Parameter]]] = {}
    used: set[str] = set()
    names: list[str] = []
    seen: set[int] = set()
    for name, p in named_params:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        names.append(name)
        pattern = next((pat for pat in param_lr if _matches(name, pat)), None)
        if pattern is not None:
            used.add(pattern)
        buckets.setdefault((p.ndim >= 2, pattern), []).append((name, p))
    unused = [pat for pat in param_lr if pat not in used]
    if unused:
        raise ConfigError(f"train.param_lr: pattern {unused[0]!r} matches no trainable parameter; trainable ones "
                          f"include {_some(names)}")
    groups = []
    for pattern in [None, *param_lr]:
        for decay in (True, False):
            params = buckets.get((decay, pattern))
            if params:
                group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
                if pattern is not None:
                    group["lr"] = float(param_lr[pattern])
                groups.append(group)
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] | list[float] = (0.9, 0.95), eps: float = 1e-8,
                    fused: str | bool = "auto", param_lr: Mapping[str, float] | None = None,
                    kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (or, ``kind="adafactor"``, Adafactor) over ``model``'s trainable parameters with the
    decay/no-decay split above.

    ``fused``: ``"auto"`` (fused where the device has the kernel, else PyTorch's default), ``"true"``/``True``
    (fused; fails if the device has no fused kernel) or ``"false"``/``False`` (PyTorch's default).

    Adafactor (Shazeer & Stern 2018) is PyTorch's: each step moves a parameter by ``lr`` (capped at
    ``1/sqrt(step)``) times the parameter's own RMS, with a factored (row x column) second moment and update
    clipping at RMS 1.  The *relative* step matters for models initialised like T5, whose weights span two orders
    of magnitude (embeddings N(0, 1), query projections N(0, 1/sqrt(d_model * d_kv)) ~ 0.01): AdamW moves every
    element by ~``lr`` whatever its scale, so at T5's learning rates the small attention weights are overwritten
    within a few dozen steps (see benchmarks/RESULTS.md, T5).
    """
    groups = param_groups(model.named_parameters(), weight_decay, param_lr)
    if not groups:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters (every parameter has "
                          f"requires_grad=False); unfreeze some or apply a delta method")
    if kind == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    if kind != "adamw":
        raise ConfigError(f"train.optimizer must be adamw or adafactor, got {kind!r}")
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
