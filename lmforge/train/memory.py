"""Training memory of a model + objective, counted rather than sampled, so CPU runs can compare methods.

    parameters    every parameter's bytes (frozen ones included: they are resident)
    gradients     trainable parameters' bytes (one gradient each)
    optimizer     AdamW's two moments per trainable element, in fp32; Adafactor's factored second moment (a row
                  and a column vector per matrix, a full vector for vectors), in fp32
    activations   the peak bytes autograd holds for backward during one forward of a training batch, measured
                  with ``torch.autograd.graph.saved_tensors_hooks``: a storage counts while some saved tensor
                  of a live graph refers to it (views of one tensor count once; parameters saved by reference
                  are not activations; graphs freed inside the forward, e.g. a norm computed and detached,
                  stop counting when freed)

On CUDA ``max_memory_allocated`` of the same step is reported beside it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple[int, str]:
    return t.untyped_storage().data_ptr(), str(t.device)


def optimizer_state_elements(p: torch.Tensor, optimizer: str = "adamw") -> int:
    """Elements of optimizer state ``p`` carries (``train.optimizer``): AdamW two full moments; Adafactor, for a
    ``[..., R, C]`` tensor, ``[..., R]`` row and ``[..., C]`` column statistics (a vector keeps a full one)."""
    if optimizer == "adamw":
        return 2 * p.numel()
    if p.ndim < 2:
        return p.numel()
    lead = p.numel() // (p.shape[-2] * p.shape[-1])
    return lead * (p.shape[-2] + p.shape[-1])


def measure_training_memory(model: nn.Module, objective: Any, batch: dict[str, torch.Tensor],
                            optimizer: str = "adamw") -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state (``optimizer``: adamw or adafactor) and saved activations for
    one training step on ``batch`` (the model's gradients are cleared afterwards; its weights are not changed)."""
    params = {id(p): p for p in model.parameters()}.values()
    param_keys = {_storage_key(p) for p in params}
    trainable = [p for p in params if p.requires_grad]
    out = {"parameters": sum(p.numel() * p.element_size() for p in params),
           "gradients": sum(p.numel() * p.element_size() for p in trainable),
           "optimizer": sum(optimizer_state_elements(p, optimizer) * 4 for p in trainable)}
    live: dict[tuple[int, str], list[int]] = {}  # storage -> [references from saved tensors, bytes]
    usage = {"now": 0, "peak": 0}

    class _Held:  # what autograd keeps; its death (graph freed) releases the storage's count
        __slots__ = ("t", "__weakref__")

        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    def release(key: tuple[int, str]) -> None:
        entry = live[key]
        entry[0] -= 1
        if entry[0] == 0:
            usage["now"] -= entry[1]
            del live[key]

    def pack(t: torch.Tensor) -> Any:
        key = _storage_key(t)
        if key in param_keys:
            return t
        entry = live.setdefault(key, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            usage["now"] += entry[1]
            usage["peak"] = max(usage["peak"], usage["now"])
        entry[0] += 1
        held = _Held(t)
        weakref.finalize(held, release, key)
        return held

    def unpack(h: Any) -> torch.Tensor:
        return h.t if isinstance(h, _Held) else h

    cuda = next(iter(params)).device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            res = objective.loss(model, batch)
        out["activations"] = usage["peak"]
        if res.loss_sum.requires_grad:
            res.loss_sum.backward()
        if cuda:
            out["cuda_max_allocated"] = int(torch.cuda.max_memory_allocated())
    finally:
        for p in trainable:
            p.grad = None
        model.train(was_training)
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer"] + out["activations"]
    return out
