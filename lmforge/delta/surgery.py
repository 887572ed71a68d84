"""What delta methods share: finding and replacing modules by name (without editing model code), the backbone's
slots, the tokens a prompt or prefix starts from.

Module paths are matched as PEFT matches them (:func:`matches`) and, for lmforge models, also on the transformers
path of the same module (:func:`lmforge.delta.names.hf_path`), so a PEFT regex written for the transformers model
selects the same layers here.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.delta.names import hf_path


def family_name(model: nn.Module) -> str | None:
    """``config.family`` as written (a name messages quote; the family itself: ``models.families.family_of``)."""
    return getattr(getattr(model, "config", None), "family", None)


def head_name(model: nn.Module) -> str | None:
    """The task head's attribute (``classifier`` / ``score``) of a classifier, else None."""
    return getattr(model, "head_name", None)


def layer_index(path: str) -> int | None:
    m = re.search(r"(?:^|\.)(?:blocks|h|layers|layer|block)\.(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def matches(path: str, patterns: list[str] | str, alt_path: str | None = None) -> bool:
    """PEFT's rule: a list matches when the path equals an entry or ends with '.' + entry; a string is a regex
    that must match the whole path.  ``alt_path`` (the transformers path of the same module) is tried too."""
    paths = [path] + ([alt_path] if alt_path and alt_path != path else [])
    if isinstance(patterns, str):
        return any(re.fullmatch(patterns, p) for p in paths)
    return any(p == t or p.endswith("." + t) for p in paths for t in patterns)


def hf_alt(model: nn.Module, path: str) -> str | None:
    """The transformers path of ``path``, or None for a module without one (or a model that is not lmforge's)."""
    try:
        return hf_path(model, path)
    except Exception:  # not an lmforge model, or a module without a transformers equivalent
        return None


def linear_examples(model: nn.Module) -> str:
    names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
    return ", ".join(names[:10])


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def is_norm(module: nn.Module) -> bool:
    # leaf modules only: bert's DenseLayerNorm holds a Linear beside its LayerNorm
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or (
        not any(True for _ in module.children()) and "norm" in type(module).__name__.lower())


def backbone_of(model: nn.Module) -> nn.Module:
    """The module with the slots (:mod:`lmforge.models.slots`): a classifier's ``backbone``, else the model itself."""
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "slot_kinds"):
        raise ConfigError(f"prompt tuning needs an lmforge model (gpt2, llama, bert, t5); {type(backbone).__name__} "
                          f"has no soft-prompt slot")
    return backbone


def slot_of(model: nn.Module, kind: str) -> nn.Module | None:
    """The module filling ``model``'s (or its backbone's) slot ``kind``; None when empty or there are no slots."""
    backbone = getattr(model, "backbone", model)
    return backbone.slot(kind) if hasattr(backbone, "slot_kinds") else None


def start_token_ids(n: int, init: str, text: str | None, tokenizer: Any, vocab: int,
                    device: torch.device) -> torch.Tensor:
    """The ``n`` tokens a prompt or prefix starts from: sampled from the vocabulary (``vocab``) or ``text``'s tokens
    repeated or cut to ``n`` (``text``)."""
    if init == "text":
        if not text:
            raise ConfigError("peft.prompt_init='text' needs peft.prompt_init_text (e.g. 'Classify the sentiment "
                              "of this review:')")
        if tokenizer is None:
            raise ConfigError("peft.prompt_init='text' needs the model's tokenizer")
        ids = list(tokenizer.encode(text))
        if not ids:
            raise ConfigError(f"peft.prompt_init_text={text!r} encodes to no tokens")
        return torch.tensor((ids * (n // len(ids) + 1))[:n], device=device)
    return torch.randint(0, vocab, (n,), device=device)
