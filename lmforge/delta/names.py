"""lmforge module paths <-> the paths the same modules have in the matching transformers model.

The transformers model is the one :func:`lmforge.models.hf.save_model` writes: ``GPT2LMHeadModel`` /
``LlamaForCausalLM`` for a ``DecoderLM``, ``BertForPreTraining`` (the ``bert.`` prefix; ``BertForMaskedLM``
and ``Bert*Classification`` share it) for an ``EncoderLM``, ``T5ForConditionalGeneration`` for an
``EncoderDecoderLM``, and ``*ForSequenceClassification`` / ``BertForTokenClassification`` for a classifier
(its ``backbone.`` maps like the bare model, the head keeps its name).  Each family's table lives with its
checkpoint code and reaches this module as the family's ``hf_name`` / ``lmforge_name``; this module only
dispatches.
"""

from __future__ import annotations

from torch import nn

from lmforge.core.errors import ModelError
from lmforge.models.families import family_of


def _backbone_map(backbone: nn.Module, path: str, to_hf: bool) -> str:
    family = family_of(backbone)
    if family is None:
        raise ModelError(f"{type(backbone).__name__} is not an lmforge model; it has no transformers names")
    return family.hf_name(path) if to_hf else family.lmforge_name(path)


def hf_path(model: nn.Module, path: str) -> str:
    """``backbone.blocks.0.attn.c_attn`` (a GPT-2 classifier) -> ``transformer.h.0.attn.c_attn``; a suffix below
    a mapped module (``.lora_A``) is kept."""
    head = getattr(model, "head_name", None)
    if head is not None:
        if path == head or path.startswith(head + "."):
            return path
        if not path.startswith("backbone."):
            raise ModelError(f"'{path}' is neither the head nor inside the backbone of this classifier")
        return _backbone_map(model.backbone, path[len("backbone."):], to_hf=True)
    return _backbone_map(model, path, to_hf=True)


def lmforge_path(model: nn.Module, path: str) -> str:
    """Inverse of :func:`hf_path`."""
    head = getattr(model, "head_name", None)
    if head is not None:
        if path == head or path.startswith(head + "."):
            return path
        return "backbone." + _backbone_map(model.backbone, path, to_hf=False)
    return _backbone_map(model, path, to_hf=False)
