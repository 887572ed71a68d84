"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): the backbone stays frozen and ``n`` soft-prompt vectors
in front of its input embeddings train.  The backbone's ``soft_prompt`` slot does the prepending
(:mod:`lmforge.models.prompt`); this module builds and initialises the prompt:

* ``vocab`` (default): the embeddings of ``n`` vocabulary tokens drawn at random -- the paper's "sampled
  vocabulary" init, which the paper found better than random init at small model sizes;
* ``text``: the embeddings of ``prompt_init_text``'s tokens, repeated or cut to ``n`` (PEFT's TEXT init);
* ``random``: N(0, s^2) with s the embedding matrix's own standard deviation, so the prompt starts at the
  scale of real words (PEFT's RANDOM init is N(0, 1), far off that scale for most models).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.models.prompt import SoftPrompt


def backbone_of(model: nn.Module) -> nn.Module:
    """The module with the ``soft_prompt`` slot: a classifier's ``backbone``, else the model itself."""
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "soft_prompt"):
        raise ConfigError(f"prompt tuning needs an lmforge model (gpt2, llama, bert, t5); {type(backbone).__name__} "
                          f"has no soft-prompt slot")
    return backbone


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


def soft_prompt_of(model: nn.Module) -> SoftPrompt | None:
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "soft_prompt", None)


def add_soft_prompt(model: nn.Module, n: int, init: str = "vocab", text: str | None = None,
                    tokenizer: Any = None) -> SoftPrompt:
    """Put a trainable ``n``-vector soft prompt into ``model``'s backbone, initialised by ``init``."""
    backbone = backbone_of(model)
    if backbone.soft_prompt is not None:
        raise ConfigError("this model already carries a soft prompt; start from the base model")
    if n < 1:
        raise ConfigError(f"peft.num_virtual_tokens={n} must be >= 1")
    table = backbone.get_input_embeddings().weight  # [V, d]
    if init not in ("vocab", "text", "random"):
        raise ConfigError(f"peft.prompt_init={init!r}; valid: vocab, text, random")
    with torch.no_grad():
        if init == "random":
            start = torch.randn(n, table.shape[1], device=table.device, dtype=table.dtype) * table.float().std()
        else:
            start = table[start_token_ids(n, init, text, tokenizer, table.shape[0], table.device)]
    prompt = SoftPrompt(n, table.shape[1], device=table.device, dtype=table.dtype)
    with torch.no_grad():
        prompt.weight.copy_(start)
    backbone.soft_prompt = prompt
    return prompt
