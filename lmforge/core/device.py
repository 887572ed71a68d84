"""Device choice in one place: ``auto`` means CUDA, then Apple's MPS, then CPU."""

from __future__ import annotations

import torch

from lmforge.core.errors import ConfigError

def check_device_name(name: str, key: str = "device") -> None:
    """Refuse a device name torch does not know, when the config is read (whether this machine has the device is
    :func:`resolve_device`'s question: a config may be written on one machine and run on another)."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key '{key}': unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use device=cpu or device=auto")
    if name.startswith("cuda:") and name[5:].isdigit() and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s) (cuda:0 ...); use device=cuda or device=auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' requested but MPS is not available; use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
