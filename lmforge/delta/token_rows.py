"""Trainable rows of a frozen embedding: the new special tokens of a chat format under a delta method.

A delta method freezes the embedding, but tokens added for a chat template (``<|im_start|>``, ``<|im_end|>``) start
as the mean of the old rows and must learn, or the model never learns to end its turn — PEFT's
``trainable_token_indices``.  Only those rows train: a parametrization replaces the listed rows of the frozen
weight with a small trainable ``[k, d]`` tensor, and the same parametrization sits on a tied LM head, so input and
output rows stay one.  Masking the gradient of the whole weight would not do: AdamW's weight decay would still move
every frozen row.  :func:`bake_token_rows` writes the rows into plain weights again before saving;
:func:`add_rows_to_peft_adapter` puts them into a PEFT adapter dir as PEFT's own ``trainable_token_indices``
(``…embed.token_adapter.trainable_tokens_delta``: the rows' values, which PEFT copies over the base rows), so
``PeftModel.from_pretrained`` on the base resized to the tokenizer rebuilds the trained model exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from lmforge.core.io import atomic_write_json
from lmforge.delta.names import hf_path


class NewRows(nn.Module):
    """``weight -> weight`` with rows ``indices`` replaced by the trainable ``rows``."""

    def __init__(self, weight: torch.Tensor, indices: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("indices", torch.tensor(list(indices), dtype=torch.long, device=weight.device))
        self.rows = nn.Parameter(weight.detach()[self.indices].clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_put((self.indices,), self.rows.to(weight.dtype))


def train_token_rows(model: nn.Module, indices: Sequence[int]) -> NewRows | None:
    """Make rows ``indices`` of ``model``'s input embedding (and its LM head, tied or not) trainable, the rest of
    both frozen as they are; returns the parametrization of the input side (None for no rows)."""
    if not indices:
        return None
    emb, head = model.get_input_embeddings(), getattr(model, "lm_head", None)
    tied = head is not None and head.weight is emb.weight
    rows = NewRows(emb.weight, indices)
    parametrize.register_parametrization(emb, "weight", rows, unsafe=True)
    if tied:
        parametrize.register_parametrization(head, "weight", rows, unsafe=True)  # the same rows: still one
    elif head is not None:
        parametrize.register_parametrization(head, "weight", NewRows(head.weight, indices), unsafe=True)
    return rows


def bake_token_rows(model: nn.Module) -> None:
    """Plain weights again, the trained rows written in (a tied head re-tied); a no-op without rows."""
    emb, head = model.get_input_embeddings(), getattr(model, "lm_head", None)
    for module in (emb, head):
        if module is not None and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def add_rows_to_peft_adapter(model: nn.Module, adapter_dir: str | Path, indices: Sequence[int]) -> bool:
    """Add rows ``indices`` of ``model``'s (baked) input embedding to the PEFT adapter in ``adapter_dir`` as
    ``trainable_token_indices``; True when written.  False (nothing written) for a dir in lmforge's format or an
    untied LM head, whose rows PEFT's token adapter does not carry."""
    d = Path(adapter_dir)
    weights, config_file = d / "adapter_model.safetensors", d / "adapter_config.json"
    head = getattr(model, "lm_head", None)
    if not indices or not weights.is_file() or not config_file.is_file() or (
            head is not None and head.weight is not model.get_input_embeddings().weight):
        return False
    name = f"base_model.model.{hf_path(model, 'embed_tokens')}.token_adapter.trainable_tokens_delta"
    state = load_file(str(weights))
    rows = model.get_input_embeddings().weight.detach()[torch.tensor(list(indices))].cpu().contiguous()
    state[name] = rows.clone()
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(weights)
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["trainable_token_indices"] = [int(i) for i in indices]
    atomic_write_json(config_file, config)
    return True
