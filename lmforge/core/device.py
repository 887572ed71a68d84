"""Device choice in one place: ``auto`` means CUDA, then Apple's MPS, then CPU."""

from __future__ import annotations

import torch

from lmforge.core.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use device=cpu or device=auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' requested but MPS is not available; use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
