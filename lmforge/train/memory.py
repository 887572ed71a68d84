"""Training memory of a model + objective, counted rather than sampled, so CPU runs can compare methods.

    parameters    every parameter's bytes (frozen ones included: they are resident)
    gradients     trainable parameters' bytes (one gradient each)
    optimizer     AdamW's two moments per trainable element, in fp32
    activations   the bytes autograd saves for backward during one forward of a training batch, measured with
                  ``torch.autograd.graph.saved_tensors_hooks`` (each storage counted once: views of one
                  tensor and parameters saved by reference are not activations)

The activation figure is the peak of saved tensors, which is reached at the end of the forward pass (backward
frees them).  On CUDA ``max_memory_allocated`` of the same step is reported beside it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple[int, str]:
    return t.untyped_storage().data_ptr(), str(t.device)


def measure_training_memory(model: nn.Module, objective: Any, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and saved activations for one training step on ``batch``
    (the model's gradients are cleared afterwards; its weights are not changed)."""
    params = {id(p): p for p in model.parameters()}.values()
    param_keys = {_storage_key(p) for p in params}
    trainable = [p for p in params if p.requires_grad]
    out = {"parameters": sum(p.numel() * p.element_size() for p in params),
           "gradients": sum(p.numel() * p.element_size() for p in trainable),
           "optimizer": sum(2 * p.numel() * 4 for p in trainable)}
    seen: dict[tuple[int, str], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_keys and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    cuda = next(iter(params)).device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            res = objective.loss(model, batch)
        out["activations"] = sum(seen.values())
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
