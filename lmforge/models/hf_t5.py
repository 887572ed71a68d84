"""Hugging Face compatibility for T5 (``T5ForConditionalGeneration``): config.json <-> T5Config, the one
name map between lmforge's module paths and HF's, and loading/saving model directories.

Public API (what the t5 family of :mod:`lmforge.models.families` loads and saves with): :func:`load_t5`,
:func:`save_t5`.

Tying and output scaling.  transformers 5.x always ties ``lm_head``/``encoder.embed_tokens``/
``decoder.embed_tokens`` to ``shared`` unless a checkpoint stores an ``lm_head.weight`` that differs from
``shared.weight`` (then it loads it untied, logging that it did not tie them), and it decides the
``d_model ** -0.5`` output scaling from ``scale_decoder_outputs`` (default: ``tie_word_embeddings`` of the
file).  lmforge follows the same rules, so a v1.1 checkpoint (separate head, no scaling) loads as v1.1
whichever transformers version wrote it.  Saving writes ``shared.weight`` once (the embeddings' HF copies
are tied to it) plus ``lm_head.weight`` when untied, as ``save_pretrained`` does.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from lmforge.core.errors import ModelError
from lmforge.models.encdec import EncoderDecoderLM
from lmforge.models.t5_layers import T5Config
from lmforge.models.model_dir import (cast_state, load_tokenizer_for, read_weights, require_model_dir, unwrap_as,
                                      write_model_dir)

__all__ = ["load_t5", "save_t5"]

_REFUSED_TYPES = {
    "mt5": "mT5 (multilingual T5) is not supported; lmforge implements model_type 't5' only",
    "umt5": "UMT5 (per-layer relative position biases) is not supported; lmforge implements model_type 't5' only",
    "longt5": "LongT5 (local/transient-global attention) is not supported; lmforge implements model_type 't5' only",
    "switch_transformers": "Switch Transformers (mixture of experts) is not supported; lmforge implements "
                           "model_type 't5' only",
}
_ACT = {"relu": ("relu",), "gated-gelu": ("gelu_new", "gelu_pytorch_tanh")}
# transformers' T5Config defaults for fields a config.json may leave out
_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None, num_heads=8,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="relu", is_encoder_decoder=True,
    is_decoder=False, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
# The decoder's first cross-attention has no relative bias; some old checkpoints carry an unused one.
_IGNORED = re.compile(r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _rows() -> list[tuple[str, str]]:
    """(lmforge module path, HF module path) templates; ``{i}`` = block index."""
    rows = [("shared", "shared"), ("lm_head", "lm_head")]
    for s in ("encoder", "decoder"):
        ff = f"{s}.block.{{i}}.layer.{2 if s == 'decoder' else 1}"
        rows += [(s, s), (f"{s}.blocks", f"{s}.block"), (f"{s}.blocks.{{i}}", f"{s}.block.{{i}}"),
                 (f"{s}.relative_attention_bias", f"{s}.block.0.layer.0.SelfAttention.relative_attention_bias"),
                 (f"{s}.blocks.{{i}}.self_attn", f"{s}.block.{{i}}.layer.0"),
                 (f"{s}.blocks.{{i}}.self_attn.layer_norm", f"{s}.block.{{i}}.layer.0.layer_norm"),
                 *[(f"{s}.blocks.{{i}}.self_attn.{p}", f"{s}.block.{{i}}.layer.0.SelfAttention.{p}") for p in "qkvo"],
                 (f"{s}.blocks.{{i}}.ff", ff), (f"{s}.blocks.{{i}}.ff.layer_norm", f"{ff}.layer_norm"),
                 *[(f"{s}.blocks.{{i}}.ff.{p}", f"{ff}.DenseReluDense.{p}") for p in ("wi", "wi_0", "wi_1", "wo")],
                 (f"{s}.final_layer_norm", f"{s}.final_layer_norm")]
    rows += [("decoder.blocks.{i}.cross_attn", "decoder.block.{i}.layer.1"),
             ("decoder.blocks.{i}.cross_attn.layer_norm", "decoder.block.{i}.layer.1.layer_norm"),
             *[(f"decoder.blocks.{{i}}.cross_attn.{p}", f"decoder.block.{{i}}.layer.1.EncDecAttention.{p}")
               for p in "qkvo"]]
    return rows


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_MAP = [(_compile(a), a, _compile(b), b) for a, b in _rows()]


def _map_module(name: str, to_hf: bool) -> str | None:
    for pat_lm, tpl_lm, pat_hf, tpl_hf in _MAP:
        m = (pat_lm if to_hf else pat_hf).match(name)
        if m:
            tpl = tpl_hf if to_hf else tpl_lm
            return tpl.replace("{i}", m.group("i")) if "{i}" in tpl else tpl
    return None


def t5_hf_module_name(name: str, to_hf: bool = True) -> str:
    """lmforge module path -> HF path in ``T5ForConditionalGeneration`` (or back with ``to_hf=False``); a suffix
    below a mapped module is kept (``encoder.blocks.0.self_attn.q.lora_A`` -> ``...SelfAttention.q.lora_A``)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        hit = _map_module(".".join(parts[:cut]), to_hf)
        if hit is not None:
            return ".".join([hit, *parts[cut:]])
    raise ModelError(f"'{name}' is not a {'lmforge' if to_hf else 'Hugging Face'} module path of a t5 model")


# ---- config.json ---------------------------------------------------------------------------------

def config_from_hf(hf: dict[str, Any], source: str = "<dict>") -> T5Config:
    """T5Config from a transformers config dict; fields lmforge does not implement are refused by name."""
    where = f"config.json of '{source}'"
    if not isinstance(hf, dict):
        raise ModelError(f"{where} is not a JSON object")
    model_type = hf.get("model_type")
    if model_type in _REFUSED_TYPES:
        raise ModelError(f"{where}: model_type '{model_type}': {_REFUSED_TYPES[model_type]}")
    if model_type != "t5":
        raise ModelError(f"{where}: model_type {model_type!r} is not a T5 model (supported: t5)")
    cfg = {**_HF_DEFAULTS, **hf}

    def refuse(field: str, supported: str) -> None:
        raise ModelError(f"{where}: field '{field}' = {cfg[field]!r} is not supported by lmforge "
                         f"(supported: {supported}); use a checkpoint without it")

    if cfg["is_decoder"]:
        refuse("is_decoder", "false (a decoder-only T5 stack has no lmforge equivalent)")
    if not cfg["is_encoder_decoder"]:
        refuse("is_encoder_decoder", "true (T5EncoderModel-only checkpoints are not supported)")
    proj = cfg["feed_forward_proj"]
    if proj not in _ACT:
        refuse("feed_forward_proj", "relu, gated-gelu")
    if cfg.get("dense_act_fn") is not None and cfg["dense_act_fn"] not in _ACT[proj]:
        refuse("dense_act_fn", f"{', '.join(_ACT[proj])} with feed_forward_proj '{proj}'")
    if cfg.get("is_gated_act") is not None and bool(cfg["is_gated_act"]) != (proj == "gated-gelu"):
        refuse("is_gated_act", f"{proj == 'gated-gelu'} with feed_forward_proj '{proj}'")
    for field in ("tie_encoder_decoder", "quantization_config"):
        if cfg.get(field):
            refuse(field, "false / null")
    tie = cfg["tie_word_embeddings"] is not False
    scale = cfg.get("scale_decoder_outputs")
    eos = cfg["eos_token_id"]
    if isinstance(eos, list):  # several stop ids: lmforge keeps the first
        eos = eos[0] if eos else 1
    try:
        return T5Config(
            vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], d_kv=cfg["d_kv"], d_ff=cfg["d_ff"],
            num_layers=cfg["num_layers"], num_decoder_layers=cfg.get("num_decoder_layers"),
            num_heads=cfg["num_heads"], relative_attention_num_buckets=cfg["relative_attention_num_buckets"],
            relative_attention_max_distance=cfg["relative_attention_max_distance"], feed_forward_proj=proj,
            dropout=float(cfg["dropout_rate"] or 0.0), layer_norm_epsilon=cfg["layer_norm_epsilon"],
            tie_word_embeddings=tie, scale_decoder_outputs=tie if scale is None else bool(scale),
            initializer_factor=cfg["initializer_factor"] or 1.0,
            pad_token_id=0 if cfg["pad_token_id"] is None else cfg["pad_token_id"],
            eos_token_id=1 if eos is None else eos, decoder_start_token_id=cfg.get("decoder_start_token_id"))
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: {e}") from None


def config_to_hf(c: T5Config) -> dict[str, Any]:
    """The transformers config.json dict for ``c`` (without dtype, which depends on the weights)."""
    return dict(
        architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=c.vocab_size, d_model=c.d_model,
        d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers, num_decoder_layers=c.decoder_layers,
        num_heads=c.num_heads, relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=c.dropout,
        layer_norm_epsilon=c.layer_norm_epsilon, initializer_factor=c.initializer_factor,
        feed_forward_proj=c.feed_forward_proj, dense_act_fn="gelu_new" if c.gated else "relu",
        is_gated_act=c.gated, is_encoder_decoder=True, is_decoder=False, tie_word_embeddings=c.tied,
        scale_decoder_outputs=c.scales_output, use_cache=True, pad_token_id=c.pad_token_id,
        eos_token_id=c.eos_token_id, decoder_start_token_id=c.start_token_id)


# ---- state dicts ---------------------------------------------------------------------------------

def state_dict_to_hf(model: EncoderDecoderLM) -> dict[str, torch.Tensor]:
    """HF keys -> tensors: ``shared.weight`` once (HF ties its embedding copies to it), head only if untied."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tied:
            continue
        module, _, param = key.rpartition(".")
        hf = _map_module(module, to_hf=True)
        if hf is None:
            raise ModelError(f"parameter '{key}' has no Hugging Face equivalent (merge or remove delta modules "
                             f"before saving a full model)")
        out[f"{hf}.{param}"] = value
    return out


def resolve_tie(config: T5Config, hf_state: dict[str, torch.Tensor]) -> T5Config:
    """transformers' rule: a stored head that differs from ``shared`` is loaded untied whatever the config says;
    a tied config with an equal (or absent) head stays tied."""
    head, shared = hf_state.get("lm_head.weight"), _shared(hf_state)
    if head is not None and shared is not None and config.tied and not torch.equal(head, shared):
        return dataclasses.replace(config, tie_word_embeddings=False, scale_decoder_outputs=config.scales_output)
    return config


def _shared(hf_state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    for key in ("shared.weight", *_EMBED_COPIES):
        if key in hf_state:
            return hf_state[key]
    return None


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: T5Config,
                       source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """HF keys -> lmforge keys; missing, unexpected or mis-shaped weights raise ``ModelError``."""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    shared = _shared(hf_state)
    if shared is not None:
        out["shared.weight"] = shared
    for key, value in hf_state.items():
        if _IGNORED.match(key) or key in _EMBED_COPIES or key == "shared.weight":
            continue
        if key == "lm_head.weight" and config.tied:
            continue  # tied: the head is the embedding
        module, _, param = key.rpartition(".")
        lm = _map_module(module, to_hf=False)
        if lm is None:
            unexpected.append(key)
        else:
            out[f"{lm}.{param}"] = value
    with torch.device("meta"):
        expected = EncoderDecoderLM(config).state_dict()
    if config.tied:
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in out]
    unexpected += [k for k in out if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            names = [t5_hf_module_name(k.rpartition(".")[0]) + "." + k.rpartition(".")[2] for k in missing[:4]]
            parts.append(f"missing {len(missing)} weight(s), e.g. {', '.join(names)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weight(s), e.g. {', '.join(unexpected[:4])}")
        raise ModelError(f"weights of '{source}' do not match its config.json (t5): {'; '.join(parts)}")
    for k, v in out.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelError(f"weights of '{source}': '{k}' has shape {list(v.shape)} but config.json implies "
                             f"{list(expected[k].shape)}")
    return out


# ---- model directories ---------------------------------------------------------------------------

def load_t5(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
            ) -> tuple[EncoderDecoderLM, Any]:
    """Load a HF/lmforge T5 directory -> ``(model in eval mode, Tokenizer or None)``; ``dtype=None`` keeps
    the stored dtype.  A tokenizer with more ids than the model has embedding rows is refused."""
    d = Path(path)
    config = config_from_hf(require_model_dir(d), source=str(d))
    tokenizer = load_tokenizer_for(d, config.vocab_size)
    hf_state = read_weights(d)
    config = resolve_tie(config, hf_state)
    state = state_dict_from_hf(hf_state, config, source=str(d))
    state = cast_state(state, device, dtype)
    with torch.device("meta"):
        model = EncoderDecoderLM(config)
    model.load_state_dict(state, strict=not config.tied, assign=True)
    model.tie_weights()
    return model.eval(), tokenizer


def save_t5(model: torch.nn.Module, path: str | Path, tokenizer: Any = None,
            generation_config: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a HF T5 checkpoint directory, atomically: ``config.json`` (architectures
    ``T5ForConditionalGeneration``), ``model.safetensors``, ``generation_config.json`` (decoder start, EOS,
    pad ids plus ``generation_config``) and the tokenizer's files when given."""
    model = unwrap_as(model, EncoderDecoderLM, "save_t5")
    c = model.config
    gen = dict(decoder_start_token_id=c.start_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    gen.update(generation_config or {})
    return write_model_dir(path, state_dict_to_hf(model), config_to_hf(c), model.dtype, tokenizer=tokenizer,
                           vocab_size=c.vocab_size, generation_config=gen)
