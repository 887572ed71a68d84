"""Hugging Face PEFT's adapter format: the pieces the methods PEFT has share (LoRA/DoRA in
:mod:`lmforge.delta.lora`, prompt tuning in :mod:`lmforge.delta.prompt`, prefix tuning in :mod:`lmforge.delta.prefix`).

A PEFT directory (``PeftModel.from_pretrained(<matching transformers model>, dir)`` gives the same logits) holds
``adapter_config.json`` (``peft_type``, ``task_type``, the method's settings, ``modules_to_save``: the head, for
classifiers) and ``adapter_model.safetensors``: the method's tensors by transformers path under ``base_model.model.``
(LoRA) or ``prompt_embeddings`` (prompt learning), and the head's (``...score.weight`` / ``...classifier.*``).
:func:`lmforge.delta.files.save_delta` writes it when the delta is one method PEFT can hold on the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import ModelError
from lmforge.delta.registry import peft_method

PEFT_PREFIX = "base_model.model."  # LoRA: PeftModel.base_model is a LoraModel holding the transformers model
PROMPT_PREFIX = "base_model."  # prompt learning: PeftModel.base_model is the transformers model itself
_TASK_TYPES = {"SequenceClassifier": "SEQ_CLS", "TokenClassifier": "TOKEN_CLS", "DecoderLM": "CAUSAL_LM",
               "EncoderDecoderLM": "SEQ_2_SEQ_LM"}


def peft_holds(model: nn.Module) -> bool:
    """Whether ``model`` is one PEFT's format describes (lmforge's backbones and classifiers)."""
    return type(model).__name__ in (*_TASK_TYPES, "EncoderLM")


def task_type(model: nn.Module) -> str | None:
    return _TASK_TYPES.get(type(model).__name__)


def head_names(model: nn.Module) -> list[str] | None:
    """PEFT's ``modules_to_save``: the classifier's head, else None."""
    return [model.head_name] if getattr(model, "head_name", None) else None


def head_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    head = getattr(model, "head_name", None)
    if head is None:  # trained or not, the head is part of what rebuilds the classifier
        return {}
    return {f"{prefix}{head}.{pname}": p for pname, p in getattr(model, head).named_parameters()}


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def copy_checked(param: torch.Tensor, value: torch.Tensor, key: str, d: Path) -> None:
    if param.shape != value.shape:
        raise ModelError(f"'{d}': '{key}' has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
    param.copy_(value)


def virtual_tokens(pc: dict[str, Any], where: str) -> int:
    """Prompt learning's ``num_virtual_tokens``, checked."""
    n = pc.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise ModelError(f"{where}: num_virtual_tokens={n!r} must be a positive integer")
    return n


def prompt_table(state: dict[str, torch.Tensor], d: Path) -> torch.Tensor:
    """Prompt learning's ``prompt_embeddings`` table."""
    table = state.get("prompt_embeddings")
    if table is None:
        raise ModelError(f"'{d}/adapter_model.safetensors' has no 'prompt_embeddings'; the adapter is incomplete")
    return table


def load_prompt_learning(model: nn.Module, state: dict[str, torch.Tensor], d: Path, target: torch.Tensor,
                         rows: torch.Tensor) -> None:
    """Prompt learning's tensors: ``rows`` (from ``prompt_embeddings``) into ``target`` and the head
    (``base_model.<head>.*``); any other tensor is refused."""
    head = getattr(model, "head_name", None)
    own = dict(model.named_parameters())
    with torch.no_grad():
        target.copy_(rows)
        for key, value in state.items():
            if key == "prompt_embeddings":
                continue
            name = key[len(PROMPT_PREFIX):] if key.startswith(PROMPT_PREFIX) else key
            if head is None or not name.startswith(head + ".") or name not in own:
                raise ModelError(f"'{d}': tensor '{key}' has no place in this model; load it onto the model type it "
                                 f"was trained for")
            copy_checked(own[name], value, key, d)


def _config_from_peft(pc: dict[str, Any], where: str) -> Any:
    """The ``DeltaConfig`` an ``adapter_config.json`` stands for, from the registered method of its ``peft_type``."""
    method = peft_method(pc.get("peft_type"))
    if method is None:
        raise ModelError(f"{where}: peft_type {pc.get('peft_type')!r} is not supported (supported: LORA, with "
                         f"use_dora for DoRA; PROMPT_TUNING; PREFIX_TUNING)")
    return method.config_from_peft(pc, where)
