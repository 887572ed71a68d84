"""Hugging Face compatibility for BERT: the one name map, state dicts, load/save (config.json <-> EncoderConfig
is :mod:`lmforge.models.encoder_config`'s).

lmforge's :class:`~lmforge.models.encoder.EncoderLM` keeps HF's module boundaries and leaf names; only
the top-level prefixes differ, so the whole map is five prefix rules plus one special key::

    embeddings.*         <-> bert.embeddings.*
    blocks.{i}.*         <-> bert.encoder.layer.{i}.*
    pooler.*             <-> bert.pooler.*
    predictions.*        <-> cls.predictions.*
    seq_relationship.*   <-> cls.seq_relationship.*
    predictions.decoder.bias <-> cls.predictions.bias   (with tied embeddings HF ties decoder.bias to
                                                          it and stores neither decoder tensor)

With untied embeddings transformers (5.x) keeps ``cls.predictions.decoder.bias`` as the bias its forward
uses and ``cls.predictions.bias`` as a separate, unused parameter: lmforge then writes the bias under both
names (older transformers always tie the two) and, reading, prefers ``decoder.bias`` when present.

A saved directory has ``architectures: ["BertForPreTraining"]`` and every weight of that class, so it
loads in ``BertForPreTraining`` with no missing or unexpected key, and in ``BertModel`` /
``BertForMaskedLM`` with no missing key (those report the heads they lack as unused -- exactly as for a
checkpoint transformers itself saves from ``BertForPreTraining``).  Any local HF BERT directory loads:
``BertModel`` (no ``bert.`` prefix), ``BertForMaskedLM`` and task checkpoints included; head weights the
directory lacks (pooler, MLM transform, NSP) are freshly initialised with a warning naming them, weights
of task heads lmforge does not model (``classifier``, ``qa_outputs``) are ignored with a warning.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from lmforge.core.errors import ModelError
from lmforge.models.encoder import EncoderLM
from lmforge.models.encoder_config import EncoderConfig
from lmforge.models.model_dir import (cast_state, load_tokenizer_for, read_weights, require_model_dir, unwrap_as,
                                      write_model_dir)

# (lmforge module prefix, HF module prefix in BertForPreTraining); a path keeps everything below it.
_PREFIXES = [
    ("embeddings", "bert.embeddings"),
    ("blocks", "bert.encoder.layer"),
    ("pooler", "bert.pooler"),
    ("predictions", "cls.predictions"),
    ("seq_relationship", "cls.seq_relationship"),
]
_BIAS_LM, _BIAS_HF = "predictions.decoder.bias", "cls.predictions.bias"
# lmforge weights that may be absent from a HF directory (BertModel has no heads, BertForMaskedLM no
# pooler/NSP); they are initialised fresh.  Everything else must be present.
_OPTIONAL = ("pooler.", "predictions.", "seq_relationship.")
# Non-weight buffers older checkpoints carry.
_IGNORED_HF_KEYS = re.compile(r"(^|\.)embeddings\.(position_ids|token_type_ids)$")
# Task heads of fine-tuned BERT classes, which this pretraining model does not have.
_TASK_HEADS = re.compile(r"^(classifier|qa_outputs|cls\.seq_relationship_head)\.")


def _swap_prefix(name: str, to_hf: bool) -> str | None:
    for lm, hf in _PREFIXES:
        src, dst = (lm, hf) if to_hf else (hf, lm)
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None


def hf_module_name(name: str, base_model: bool = False) -> str:
    """lmforge module path -> HF module path in ``BertForPreTraining`` (``blocks.0.attention.self.query``
    -> ``bert.encoder.layer.0.attention.self.query``); a suffix such as ``.lora_A`` is kept.  With
    ``base_model`` the path is relative to ``BertModel`` (no ``bert.`` prefix; heads have none)."""
    out = _swap_prefix(name, to_hf=True)
    if out is None:
        raise ModelError(f"'{name}' is not a module path of an lmforge BERT model")
    if base_model:
        if not out.startswith("bert."):
            raise ModelError(f"'{name}' is a pretraining head, which BertModel does not have")
        out = out[len("bert."):]
    return out


def lmforge_module_name(hf_name: str) -> str:
    """HF module path (``BertForPreTraining`` or ``BertModel``-relative) -> lmforge module path."""
    name = hf_name if hf_name.startswith(("bert.", "cls.")) else "bert." + hf_name
    out = _swap_prefix(name, to_hf=False)
    if out is None:
        raise ModelError(f"'{hf_name}' is not a Hugging Face BERT module path")
    return out


# ---- state dicts ---------------------------------------------------------------------------------

def state_dict_to_hf(model: EncoderLM) -> dict[str, torch.Tensor]:
    """Weights under ``BertForPreTraining`` key names (the tied decoder weight left out, as HF saves)."""
    model = unwrap_as(model, EncoderLM, "save_bert")
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "predictions.decoder.weight" and model.config.tie_embeddings:
            continue
        if key == _BIAS_LM and not model.config.tie_embeddings:
            out["cls.predictions.decoder.bias"] = value.clone()  # what an untied HF head computes with
        hf_key = _BIAS_HF if key == _BIAS_LM else _swap_prefix(key, to_hf=True)
        if hf_key is None:
            raise ModelError(f"parameter '{key}' has no Hugging Face equivalent (merge or remove delta "
                             f"modules before saving a full model)")
        out[hf_key] = value
    return out


def _normalise_hf_keys(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old TF-converted names (``gamma``/``beta``), a missing ``bert.`` prefix (BertModel checkpoints)
    and non-weight buffers -> ``BertForPreTraining`` keys."""
    state = {}
    for k, v in hf_state.items():
        if _IGNORED_HF_KEYS.search(k):
            continue
        k = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)) if "LayerNorm" in k else k
        state[k] = v
    if not any(k.startswith("bert.") for k in state):
        state = {(k if k.startswith("cls.") or _TASK_HEADS.match(k) else "bert." + k): v for k, v in state.items()}
    return state


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: EncoderConfig,
                       source: str = "<state dict>") -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF keys -> lmforge keys.  Returns ``(state, missing_heads)``: ``missing_heads`` are lmforge keys of
    head weights the checkpoint lacks (the caller initialises them).  A missing encoder weight, an
    unknown key under ``bert.`` or a shape mismatch raises ``ModelError``."""
    state = _normalise_hf_keys(hf_state)
    if "cls.predictions.decoder.bias" in state:  # the bias HF's decoder applies (see the module doc)
        state[_BIAS_HF] = state.pop("cls.predictions.decoder.bias")
    if config.tie_embeddings:
        state.pop("cls.predictions.decoder.weight", None)  # old checkpoints store the tied copy
    out: dict[str, torch.Tensor] = {}
    unexpected, ignored = [], []
    for key, value in state.items():
        lm_key = _BIAS_LM if key == _BIAS_HF else _swap_prefix(key, to_hf=False)
        if lm_key is None:
            (ignored if _TASK_HEADS.match(key) else unexpected).append(key)
            continue
        out[lm_key] = value
    with torch.device("meta"):
        expected = EncoderLM(config).state_dict()
    if config.tie_embeddings:
        expected.pop("predictions.decoder.weight")
    unexpected += [hf_module_name(k.rpartition(".")[0]) + "." + k.rpartition(".")[2]
                   for k in out if k not in expected]
    missing = [k for k in expected if k not in out]
    missing_core = [k for k in missing if not k.startswith(_OPTIONAL)]
    if missing_core or unexpected:
        parts = []
        if missing_core:
            parts.append(f"missing {len(missing_core)} weight(s), e.g. " + ", ".join(
                _BIAS_HF if k == _BIAS_LM else hf_module_name(k.rpartition('.')[0]) + '.' + k.rpartition('.')[2]
                for k in missing_core[:4]))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weight(s), e.g. {', '.join(unexpected[:4])}")
        raise ModelError(f"weights of '{source}' do not match its config.json (bert): {'; '.join(parts)}")
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in out.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k, got, want = bad[0]
        raise ModelError(f"weights of '{source}': '{k}' has shape {list(got)} but config.json implies "
                         f"{list(want)} ({len(bad)} mismatched tensor(s))")
    if ignored:
        warnings.warn(f"'{source}': ignoring {len(ignored)} task-head weight(s) lmforge's BERT does not have "
                      f"({', '.join(ignored[:4])})", stacklevel=3)
    return out, missing


# ---- model directories ---------------------------------------------------------------------------

def load_bert_config(path: str | Path) -> EncoderConfig:
    """The EncoderConfig of a model directory (reads config.json only)."""
    d = Path(path)
    return EncoderConfig.from_hf(require_model_dir(d), source=str(d))


def load_bert(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
              ) -> tuple[EncoderLM, Any]:
    """Load a HF/lmforge BERT directory -> ``(model in eval mode, Tokenizer or None)``.

    Weights: ``model.safetensors`` (or sharded, or ``pytorch_model.bin`` read with ``weights_only``).
    ``dtype=None`` keeps the stored dtype.  Head weights the directory lacks are initialised as
    transformers would (a warning names them).  The tokenizer loads when ``tokenizer.json`` exists.
    """
    d = Path(path)
    config = load_bert_config(d)
    tokenizer = load_tokenizer_for(d, config.vocab_size)
    state, missing = state_dict_from_hf(read_weights(d), config, source=str(d))
    state = cast_state(state, device, dtype)
    if missing:
        warnings.warn(f"'{d}' has no weights for {len(missing)} head parameter(s) "
                      f"({', '.join(missing[:4])}); they are newly initialised", stacklevel=2)
        model = EncoderLM(config, device=device)  # initialised, then overwritten where the file has weights
        if dtype is not None:
            model = model.to(dtype)
        model.load_state_dict(state, strict=False)
    else:
        with torch.device("meta"):
            model = EncoderLM(config)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
    return model.eval(), tokenizer


def save_bert(model: torch.nn.Module, path: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` as a HF BERT directory (atomically: tmp dir, then rename): ``config.json``
    (``BertForPreTraining``), ``model.safetensors`` and, when given, the tokenizer's files."""
    model = unwrap_as(model, EncoderLM, "save_bert")
    config = model.config
    return write_model_dir(path, state_dict_to_hf(model), config.to_hf(), model.dtype, tokenizer=tokenizer,
                           vocab_size=config.vocab_size,
                           model_max_length=(tokenizer.model_max_length or config.max_seq_len) if tokenizer else None)
