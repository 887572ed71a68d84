"""Hugging Face compatibility for decoder LMs: config.json <-> DecoderConfig, the one name/layout map
per family, and loading/saving decoder model directories (the files, and ``load_model`` / ``save_model`` for
every family, are :mod:`lmforge.models.model_dir`'s; they are re-exported here, where callers have always found them).

A model directory is a Hugging Face checkpoint (``config.json``, ``model.safetensors``, tokenizer files,
``generation_config.json``).  lmforge's module paths are its own and uniform across families
(``blocks.3.attn.q_proj``); the Linear leaf names are Hugging Face's.  The tables in ``_MODULE_MAPS`` are
the only place where lmforge paths meet HF paths, including GPT-2's ``Conv1D`` layers, whose weights HF
stores transposed (``[in, out]``) — lmforge uses ``nn.Linear`` (``[out, in]``) throughout.

Families: ``gpt2`` <-> model_type gpt2; ``llama`` <-> llama, mistral (without sliding window: same math)
and qwen2 (llama with biases on q, k, v only: ``DecoderConfig.qkv_bias``).  Saving writes model_type
``gpt2``, ``llama``, or ``qwen2`` when ``qkv_bias`` is set.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from lmforge.core.errors import ModelError
from lmforge.models.decoder import DecoderConfig, DecoderLM
from lmforge.models.model_dir import (cast_state, is_model_dir, load_model, load_tokenizer_for, read_weights,  # noqa: F401
                                      require_model_dir, save_model, unwrap_as, unwrap_model, write_model_dir)

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")

# (lmforge module path, HF module path in the *ForCausalLM model, HF stores the weight transposed)
_MODULE_MAPS: dict[str, list[tuple[str, str, bool]]] = {
    "gpt2": [
        ("embed_tokens", "transformer.wte", False),
        ("embed_positions", "transformer.wpe", False),
        ("blocks", "transformer.h", False),
        ("blocks.{i}", "transformer.h.{i}", False),
        ("blocks.{i}.attn_norm", "transformer.h.{i}.ln_1", False),
        ("blocks.{i}.attn", "transformer.h.{i}.attn", False),
        ("blocks.{i}.attn.c_attn", "transformer.h.{i}.attn.c_attn", True),
        ("blocks.{i}.attn.c_proj", "transformer.h.{i}.attn.c_proj", True),
        ("blocks.{i}.mlp_norm", "transformer.h.{i}.ln_2", False),
        ("blocks.{i}.mlp", "transformer.h.{i}.mlp", False),
        ("blocks.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_fc", True),
        ("blocks.{i}.mlp.c_proj", "transformer.h.{i}.mlp.c_proj", True),
        ("norm", "transformer.ln_f", False),
        ("lm_head", "lm_head", False),
    ],
    "llama": [
        ("embed_tokens", "model.embed_tokens", False),
        ("blocks", "model.layers", False),
        ("blocks.{i}", "model.layers.{i}", False),
        ("blocks.{i}.attn_norm", "model.layers.{i}.input_layernorm", False),
        ("blocks.{i}.attn", "model.layers.{i}.self_attn", False),
        *[(f"blocks.{{i}}.attn.{p}", f"model.layers.{{i}}.self_attn.{p}", False)
          for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
        ("blocks.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm", False),
        ("blocks.{i}.mlp", "model.layers.{i}.mlp", False),
        *[(f"blocks.{{i}}.mlp.{p}", f"model.layers.{{i}}.mlp.{p}", False)
          for p in ("gate_proj", "up_proj", "down_proj")],
        ("norm", "model.norm", False),
        ("lm_head", "lm_head", False),
    ],
}
_BASE_PREFIX = {"gpt2": "transformer.", "llama": "model."}
# Buffers some HF checkpoints carry that hold no weights (old GPT-2 causal-mask buffers, old RoPE caches).
_IGNORED_HF_KEYS = re.compile(r"(\.attn\.(bias|masked_bias)|\.rotary_emb\.inv_freq)$")


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_COMPILED = {fam: [(_compile(a), a, _compile(b), b, t) for a, b, t in rows] for fam, rows in _MODULE_MAPS.items()}


def _map_module(family: str, name: str, to_hf: bool) -> tuple[str, bool] | None:
    """Exact module-path mapping; returns (mapped path, transposed) or None."""
    for pat_lm, tpl_lm, pat_hf, tpl_hf, transposed in _COMPILED[family]:
        m = (pat_lm if to_hf else pat_hf).match(name)
        if m:
            tpl = tpl_hf if to_hf else tpl_lm
            return (tpl.replace("{i}", m.group("i")) if "{i}" in tpl else tpl), transposed
    return None


def _map_path(family: str, name: str, to_hf: bool) -> str:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # longest mapped prefix, rest kept (e.g. '.lora_A')
        hit = _map_module(family, ".".join(parts[:cut]), to_hf)
        if hit is not None:
            return ".".join([hit[0], *parts[cut:]])
    side = "lmforge" if to_hf else "Hugging Face"
    raise ModelError(f"'{name}' is not a {side} module path of a {family} model")


def hf_module_name(config: DecoderConfig, name: str) -> str:
    """lmforge module path -> HF module path in the ``*ForCausalLM`` model
    (``blocks.0.attn.q_proj`` -> ``model.layers.0.self_attn.q_proj``); a suffix below a mapped module is
    kept (``blocks.0.attn.c_attn.lora_A`` -> ``transformer.h.0.attn.c_attn.lora_A``)."""
    return _map_path(config.family, name, to_hf=True)


def lmforge_module_name(config: DecoderConfig, hf_name: str) -> str:
    """HF module path -> lmforge module path (inverse of :func:`hf_module_name`)."""
    return _map_path(config.family, hf_name, to_hf=False)


def hf_weight_is_transposed(config: DecoderConfig, name: str) -> bool:
    """True if HF stores this lmforge module's weight transposed (GPT-2's Conv1D layers)."""
    hit = _map_module(config.family, name, to_hf=True)
    return bool(hit and hit[1])


# ---- state dicts ---------------------------------------------------------------------------------

def state_dict_to_hf(model: DecoderLM) -> dict[str, torch.Tensor]:
    """The model's weights under HF key names and layouts (tied head left out, as HF saves it)."""
    model = unwrap_as(model, DecoderLM, "save_decoder")
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        module, _, param = key.rpartition(".")
        hit = _map_module(config.family, module, to_hf=True)
        if hit is None:
            raise ModelError(f"parameter '{key}' has no Hugging Face equivalent (merge or remove delta "
                             f"modules before saving a full model)")
        hf_module, transposed = hit
        out[f"{hf_module}.{param}"] = value.t() if transposed and param == "weight" else value
    return out


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: DecoderConfig,
                       source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """HF keys/layouts -> lmforge keys/layouts; missing or unexpected keys raise ``ModelError``."""
    family = config.family
    prefix = _BASE_PREFIX[family]
    keys = [k for k in hf_state if not _IGNORED_HF_KEYS.search(k)]
    if not any(k.startswith(prefix) for k in keys):  # a base-model checkpoint (GPT2Model, LlamaModel)
        hf_state = {(k if k.startswith("lm_head.") else prefix + k): v for k, v in hf_state.items()}
        keys = [k if k.startswith("lm_head.") else prefix + k for k in keys]
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key in keys:
        module, _, param = key.rpartition(".")
        hit = _map_module(family, module, to_hf=False)
        if hit is None:
            unexpected.append(key)
            continue
        lm_module, transposed = hit
        if lm_module == "lm_head" and config.tie_embeddings:
            continue  # tied: the head is the embedding
        value = hf_state[key]
        # Contiguous: loaded with assign=True, a transposed view would become a strided Parameter (slower matmuls,
        # and FSDP cannot shard it).
        out[f"{lm_module}.{param}"] = value.t().contiguous() if transposed and param == "weight" else value
    with torch.device("meta"):
        expected = DecoderLM(config).state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in out]
    unexpected += [k for k in out if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weight(s), e.g. " +
                         ", ".join(hf_module_name(config, k.rpartition('.')[0]) + '.' + k.rpartition('.')[2]
                                   for k in missing[:4]))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weight(s), e.g. {', '.join(unexpected[:4])}")
        raise ModelError(f"weights of '{source}' do not match its config.json ({config.family}): "
                         f"{'; '.join(parts)}")
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in out.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k, got, want = bad[0]
        raise ModelError(f"weights of '{source}': '{k}' has shape {list(got)} but config.json implies "
                         f"{list(want)} ({len(bad)} mismatched tensor(s))")
    return out


# ---- config.json ---------------------------------------------------------------------------------

_GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh")
_LLAMA_ACTS = ("silu", "swish")
# transformers' class defaults for fields a config.json may leave out
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                 layer_norm_epsilon=1e-5, initializer_range=0.02, bos_token_id=50256, eos_token_id=50256,
                 pad_token_id=None, tie_word_embeddings=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
                  use_sliding_window=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
                    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                    sliding_window=4096),
}
_COMMON_DEFAULTS = dict(initializer_range=0.02, attention_dropout=0.0, pad_token_id=None, hidden_act="silu")


def config_from_hf(hf: dict[str, Any], source: str = "<dict>") -> DecoderConfig:
    """DecoderConfig from a transformers config dict; anything lmforge does not implement is refused."""
    where = f"config.json of '{source}'"
    if not isinstance(hf, dict):
        raise ModelError(f"{where} is not a JSON object")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{where}: model_type {model_type!r} is not supported by lmforge's decoder models "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    cfg = {**_COMMON_DEFAULTS, **_HF_DEFAULTS[model_type], **hf}

    def refuse(field: str, supported: str) -> None:
        raise ModelError(f"{where}: field '{field}' = {cfg[field]!r} is not supported by lmforge "
                         f"(supported: {supported}); use a checkpoint without it")

    def require(field: str, ok, supported: str) -> None:
        if field in cfg and not ok(cfg[field]):
            refuse(field, supported)

    # Features of any family that lmforge does not implement.
    for field in ("rope_scaling", "attn_logit_softcapping", "final_logit_softcapping", "quantization_config"):
        require(field, lambda v: v is None, "null")
    require("pretraining_tp", lambda v: v in (None, 1), "1")
    require("add_cross_attention", lambda v: not v, "false")
    require("is_encoder_decoder", lambda v: not v, "false")
    require("tie_word_embeddings", lambda v: isinstance(v, bool), "true, false")

    def token_id(field: str) -> int | None:
        v = cfg.get(field)
        if isinstance(v, list):  # several stop ids (e.g. Llama 3): lmforge keeps the first
            v = v[0] if v else None
        if v is not None and not (isinstance(v, int) and 0 <= v < int(cfg["vocab_size"])):
            warnings.warn(f"{where}: {field}={v!r} is outside the vocabulary; ignored", stacklevel=3)
            v = None
        return v

    ids = dict(bos_token_id=token_id("bos_token_id"), eos_token_id=token_id("eos_token_id"),
               pad_token_id=token_id("pad_token_id"))

    if model_type == "gpt2":
        require("activation_function", lambda v: v in _GPT2_ACTS, ", ".join(_GPT2_ACTS))
        require("scale_attn_weights", lambda v: v is True, "true")
        require("scale_attn_by_inverse_layer_idx", lambda v: not v, "false")
        require("reorder_and_upcast_attn", lambda v: not v, "false")
        drops = {k: float(cfg[k]) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        if len(set(drops.values())) > 1:
            raise ModelError(f"{where}: fields 'resid_pdrop', 'embd_pdrop', 'attn_pdrop' = "
                             f"{list(drops.values())} differ, which lmforge does not support (supported: one "
                             f"value for all three, lmforge's model.dropout)")
        kwargs = dict(family="gpt2", vocab_size=cfg["vocab_size"], d_model=cfg["n_embd"], n_layer=cfg["n_layer"],
                      n_head=cfg["n_head"], d_ff=cfg.get("n_inner"), max_seq_len=cfg["n_positions"],
                      norm_eps=cfg["layer_norm_epsilon"], dropout=drops["resid_pdrop"],
                      tie_embeddings=cfg["tie_word_embeddings"])
    else:
        require("hidden_act", lambda v: v in _LLAMA_ACTS, ", ".join(_LLAMA_ACTS))
        d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        require("head_dim", lambda v: v is None or (heads and v * heads == d),
                f"hidden_size / num_attention_heads = {d // heads if heads else '?'}")
        theta = _rope_theta(cfg, where)
        if model_type == "qwen2":
            require("use_sliding_window", lambda v: not v, "false")
        if model_type == "mistral":
            require("sliding_window", lambda v: v is None, "null")
        require("layer_types", lambda v: v is None or all(t == "full_attention" for t in v),
                "null or all 'full_attention'")
        if model_type == "llama":
            biases = dict(attention_bias=bool(cfg.get("attention_bias")), mlp_bias=bool(cfg.get("mlp_bias")))
        elif model_type == "qwen2":
            biases = dict(qkv_bias=True)
        else:
            biases = {}
        kwargs = dict(family="llama", vocab_size=cfg["vocab_size"], d_model=d, n_layer=cfg["num_hidden_layers"],
                      n_head=heads, n_kv_head=cfg.get("num_key_value_heads"), d_ff=cfg["intermediate_size"],
                      max_seq_len=cfg["max_position_embeddings"], norm_eps=cfg["rms_norm_eps"],
                      rope_theta=theta, dropout=float(cfg.get("attention_dropout") or 0.0),
                      tie_embeddings=cfg["tie_word_embeddings"], **biases)
    kwargs["initializer_range"] = cfg.get("initializer_range") or 0.02
    try:
        return DecoderConfig(**kwargs, **ids)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: {e}") from None


def _rope_theta(cfg: dict[str, Any], where: str) -> float:
    params = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict):
            raise ModelError(f"{where}: field 'rope_parameters' = {params!r} is not a mapping")
        if any(isinstance(v, dict) for v in params.values()):  # per-layer-type rope parameters
            raise ModelError(f"{where}: field 'rope_parameters' = {params!r} is not supported by lmforge "
                             f"(supported: one default rope for all layers)")
        extra = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta")}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" or any(not (k == "partial_rotary_factor" and v == 1.0) for k, v in extra.items()):
            raise ModelError(f"{where}: field 'rope_parameters' = {params!r} is not supported by lmforge "
                             f"(supported: rope_type 'default' with rope_theta); use a checkpoint without it")
        theta = params.get("rope_theta", theta)
    return float(theta) if theta is not None else 10000.0


def hf_model_type(config: DecoderConfig) -> str:
    if config.family == "gpt2":
        return "gpt2"
    return "qwen2" if config.qkv_bias else "llama"


def config_to_hf(config: DecoderConfig) -> dict[str, Any]:
    """The transformers config.json dict for ``config`` (without dtype, which depends on the weights)."""
    c = config
    ids = dict(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    if c.family == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size,
                    n_positions=c.max_seq_len, n_embd=c.d_model, n_layer=c.n_layer, n_head=c.n_head,
                    n_inner=c.ffn_dim, activation_function="gelu_new", resid_pdrop=c.dropout,
                    embd_pdrop=c.dropout, attn_pdrop=c.dropout, layer_norm_epsilon=c.norm_eps,
                    initializer_range=c.initializer_range, scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                    add_cross_attention=False, tie_word_embeddings=c.tie_embeddings, use_cache=True, **ids)
    model_type = hf_model_type(c)
    out: dict[str, Any] = dict(
        architectures=["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        model_type=model_type, vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim, hidden_act="silu", max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attention_dropout=c.dropout, initializer_range=c.initializer_range,
        tie_word_embeddings=c.tie_embeddings, use_cache=True, **ids)
    if model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer,
                   layer_types=["full_attention"] * c.n_layer)
    else:
        out.update(attention_bias=c.has_attention_bias, mlp_bias=c.has_mlp_bias, pretraining_tp=1)
    return out


# ---- model directories (the files themselves: lmforge.models.model_dir) ---------------------------

def load_config(path: str | Path) -> DecoderConfig:
    """The DecoderConfig of a model directory (reads config.json only)."""
    d = Path(path)
    return DecoderConfig.from_hf(require_model_dir(d), source=str(d))


def load_decoder(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
                 ) -> tuple[DecoderLM, Any]:
    """Load a HF/lmforge decoder directory -> ``(model in eval mode, Tokenizer or None)``.

    Reads ``model.safetensors`` (or sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``
    with ``weights_only=True``).  ``dtype=None`` keeps the stored dtype.  The tokenizer is loaded when
    ``tokenizer.json`` exists; one with more ids than the model has embedding rows is refused.
    """
    d = Path(path)
    config = load_config(d)
    tokenizer = load_tokenizer_for(d, config.vocab_size)
    state = state_dict_from_hf(read_weights(d), config, source=str(d))
    state = cast_state(state, device, dtype)
    with torch.device("meta"):
        model = DecoderLM(config)
    model.load_state_dict(state, strict=not config.tie_embeddings, assign=True)
    model.tie_weights()
    return model.eval(), tokenizer


def save_decoder(model: torch.nn.Module, path: str | Path, tokenizer: Any = None,
                 generation_config: dict[str, Any] | None = None) -> Path:
    """Write a decoder as a HF checkpoint directory (atomically: tmp dir, then rename).

    Files: ``config.json`` (incl. ``architectures``, ``model_type``, ``dtype``), ``model.safetensors``
    (HF key names/layouts, tied head stored once as HF does), ``generation_config.json`` (token ids plus
    ``generation_config``), and the tokenizer's files when ``tokenizer`` is given.
    """
    model = unwrap_as(model, DecoderLM, "save_decoder")
    config = model.config
    gen = {k: v for k, v in dict(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                 pad_token_id=config.pad_token_id).items() if v is not None}
    gen.update(generation_config or {})
    return write_model_dir(path, state_dict_to_hf(model), config.to_hf(), model.dtype, tokenizer=tokenizer,
                           vocab_size=config.vocab_size, generation_config=gen)
