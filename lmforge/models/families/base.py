"""The :class:`Family` object and the registry of families.

A family is everything lmforge knows about one kind of model under one name (``config.family``): its config
and model classes, its Hugging Face checkpoint form, the defaults delta methods start from, its pretraining
objective (by name: the objectives layer above ``models`` maps names to classes) and how it fine-tunes for
each task type.  Code outside a family's own files asks the registry (:func:`get_family`, :func:`family_of`,
:func:`family_for_hf_config`) instead of comparing family names.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.models.flops import FlopFormula
from lmforge.models.model_dir import unwrap_model

Kind = Literal["decoder", "encoder", "encoder-decoder"]


@dataclass(frozen=True)
class Family:
    """One model family.  The callables take and return lmforge objects and Hugging Face dicts:

    - ``config_from_hf(config.json dict, source) -> config`` (``source`` names the directory in messages; fields
      lmforge does not implement are refused by name), ``config_to_hf(config) -> dict`` (without dtype);
    - ``state_dict_to_hf(model) -> {HF key: tensor}``, ``state_dict_from_hf(hf_state, config, source) ->
      {lmforge key: tensor}``;
    - ``hf_name(path) -> HF module path`` and ``lmforge_name(hf_path) -> lmforge path`` (a suffix below a mapped
      module, such as ``.lora_A``, is kept): what PEFT key names and target patterns are matched on;
    - ``load(path, device, dtype) -> (model in eval mode, Tokenizer or None)``, ``save(model, path, tokenizer,
      generation_config) -> path``: a model directory (a Hugging Face checkpoint).
    """

    name: str
    """``config.family``, the registry key."""
    model_types: Mapping[str, str]
    """HF ``model_type`` values the family loads -> transformers' class-name prefix (``qwen2`` -> ``Qwen2``, as in
    ``Qwen2ForSequenceClassification``)."""
    kind: Kind
    """decoder (causal: generates by continuing), encoder (bidirectional, no generation) or encoder-decoder."""
    config_class: type
    model_class: type
    config_from_hf: Callable[[dict[str, Any], str], Any]
    config_to_hf: Callable[[Any], dict[str, Any]]
    state_dict_to_hf: Callable[[nn.Module], dict[str, torch.Tensor]]
    state_dict_from_hf: Callable[[dict[str, torch.Tensor], Any, str], dict[str, torch.Tensor]]
    hf_name: Callable[[str], str]
    lmforge_name: Callable[[str], str]
    load: Callable[..., tuple[nn.Module, Any]]
    save: Callable[..., Path]
    pretrain_objective: str
    """The pretraining objective's name: ``causal_lm``, ``mlm_nsp`` or ``span``."""
    finetune: Mapping[str, str] = field(default_factory=dict)
    """Task type -> how the family fine-tunes for it: ``head`` (a sequence classifier), ``token_head``,
    ``seq2seq`` (text to text) or ``completion`` (a decoder continuing a prompt)."""
    why_not: Mapping[str, str] = field(default_factory=dict)
    """One-line reasons for what the family does not do: by task type (the fine-tuning plan's error), and
    ``sequence_classifier`` / ``classifier_dir`` where it has no classification head."""
    lora_targets: tuple[str, ...] = ()
    """PEFT's default LoRA targets for the family (leaf names)."""
    adapter_sites: tuple[Any, Any] | None = None
    """(attention-output Linear, feed-forward-output Linear) a bottleneck adapter follows: lists match as in
    PEFT (the path or its last parts), a string is a regex the whole path matches."""
    prefix_sites: tuple[str, str | None] | None = None
    """Module paths of layer ``{i}``'s key and value outputs that prefix tuning reads (None for the value: the
    key's module gives both, as GPT-2's fused ``c_attn``)."""
    prefix_shape: Callable[[Any], tuple[int, int, int]] | None = None
    """config -> (layers, key/value heads, head dim) of the attention a prefix feeds."""
    classifier: Literal["pooled", "last_token"] | None = None
    """How a sequence classifier reads a sequence: ``pooled`` (the pooler on the first position, head
    ``classifier`` with bias and dropout: BERT), ``last_token`` (the last real token, head ``score`` without
    bias: decoders) or None (no classification head)."""
    token_classifier: bool = False
    """A token classifier (a label per position) fits: the family sees both sides of each token."""
    needs_pad_token: bool = False
    """A pad token distinct from EOS is added (``ensure_pad_token``) before fine-tuning a classifier or a
    completion: decoders, whose classifier reads the last real token and whose EOS is a target."""
    fan_in_fan_out: bool = False
    """HF stores the Linear weights transposed (GPT-2's Conv1D): PEFT's ``fan_in_fan_out``."""
    flops: FlopFormula | None = None
    """Its parameter and training-FLOP counts (:mod:`lmforge.models.flops`): what MFU, scaling sweeps and fits use;
    None: the family has none (MFU is not reported, a scaling sweep refuses it)."""

    def plan(self, task_type: str) -> str:
        """How the family fine-tunes for ``task_type`` (see :attr:`finetune`), or a ConfigError saying why not."""
        if task_type in self.finetune:
            return self.finetune[task_type]
        raise ConfigError(f"task type '{task_type}' is not available for model family '{self.name}': "
                          f"{self.why_not.get(task_type, '')}")


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (registering the same object again is a no-op); its name and its model
    types must not be another family's."""
    if _FAMILIES.get(family.name) is family:
        return family
    if family.name in _FAMILIES:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    taken = {t: f.name for f in _FAMILIES.values() for t in f.model_types}
    clash = [t for t in family.model_types if t in taken]
    if clash:
        raise ValueError(f"model_type {clash[0]!r} of family {family.name!r} already belongs to family "
                         f"{taken[clash[0]]!r}")
    _FAMILIES[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())


def get_family(name: str) -> Family:
    """The family registered as ``name``; an unknown name is a ConfigError listing the registered ones."""
    if name in _FAMILIES:
        return _FAMILIES[name]
    names = list(_FAMILIES)
    match = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
    raise ConfigError(f"model family {name!r} is not one of {', '.join(names)}"
                      f"{f' (did you mean {match[0]!r}?)' if match else ''}")


def family_of(model_or_config: Any) -> Family | None:
    """The family of a model (a classifier's is its backbone's; compile/DDP wrappers are looked through) or of
    a config; None for anything without a registered ``config.family``."""
    obj = unwrap_model(model_or_config) if isinstance(model_or_config, nn.Module) else model_or_config
    config = getattr(obj, "config", obj)
    return _FAMILIES.get(getattr(config, "family", None))


def family_for_hf_config(hf_config: dict[str, Any], source: str = "<dict>") -> Family:
    """The family that loads a transformers ``config.json`` dict, by its ``model_type``.  Classification
    directories (``*ForSequenceClassification``) are the same families' backbones: see ``models.hf_task``."""
    model_type = hf_config.get("model_type")
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    # the message lmforge has always given: a model type it does not know went to the decoder loader
    decoders = [t for f in _FAMILIES.values() if f.kind == "decoder" for t in f.model_types]
    raise ModelError(f"config.json of '{source}': model_type {model_type!r} is not supported by lmforge's decoder "
                     f"models (supported: {', '.join(decoders)})")


def flop_formula(config: Any) -> FlopFormula:
    """The FLOP formula of ``config``'s family; a family without one is a ConfigError."""
    family = get_family(getattr(config, "family", None))
    if family.flops is None:
        raise ConfigError(f"model family {family.name!r} registers no FLOP formula (Family.flops); give it one "
                          f"(lmforge.models.flops.FlopFormula) to count its FLOPs")
    return family.flops


def model_params(config: Any, non_embedding: bool = True) -> int:
    """Parameters of ``config``'s model by its family's formula (``non_embedding``: without embedding tables)."""
    return flop_formula(config).params(config, non_embedding)


def train_flops_per_token(config: Any, seq_len: int, **shape: Any) -> float:
    """Training FLOPs per token by ``config``'s family's formula (see :class:`~lmforge.models.flops.FlopFormula`)."""
    return flop_formula(config).per_token(config, seq_len, **shape)
