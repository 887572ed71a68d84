"""``DecoderConfig``, the architecture of a decoder-only LM, and its Hugging Face ``config.json`` form.

The config.json mapping lives with the config (``DecoderConfig.from_hf`` / ``to_hf``), so the checkpoint code in
:mod:`lmforge.models.hf` imports the config and never the reverse.  model_type ``gpt2`` <-> family gpt2;
``llama``, ``mistral`` (without sliding window: same math) and ``qwen2`` (llama with biases on q, k, v only:
``qkv_bias``) <-> family llama.  Saving writes ``gpt2``, ``llama``, or ``qwen2`` when ``qkv_bias`` is set.
Fields lmforge does not implement are refused by name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args, get_type_hints

from lmforge.core.errors import ModelError
from lmforge.models.layers import need

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "mistral")


@dataclass
class DecoderConfig:
    """Architecture of a decoder-only LM (the ``model:`` section of a run config).

    Fields left ``None`` take the family's default, resolved by the read-only properties below
    (``kv_heads``, ``ffn_dim``, ``has_attention_bias``, ``has_mlp_bias``) rather than written back, so
    ``dataclasses.replace(cfg, d_model=...)`` in a sweep re-derives them.

    - ``family``: ``gpt2`` (learned positions, LayerNorm, GELU-tanh MLP, biases, fused ``c_attn``) or
      ``llama`` (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases by default).  A variant family
      subclasses DecoderConfig with its own ``family`` Literal and builds on llama's architecture.
    - ``n_kv_head``: key/value heads (llama; ``None`` = ``n_head``, i.e. no GQA).
    - ``d_ff``: MLP width.  ``None`` = ``4 * d_model`` for gpt2; for llama ``8 * d_model / 3`` rounded up
      to a multiple of 64 (Llama's 2/3-of-4d rule; 64 rather than Llama's 256 so tiny models stay tiny).
    - ``attention_bias``: biases on q, k, v and the output projection (HF Llama's ``attention_bias``).
      ``None`` = family default (gpt2: True and required; llama: False).
    - ``qkv_bias``: llama only — biases on q, k, v but not the output projection (Qwen2's layout).
    - ``mlp_bias``: biases in the MLP.  ``None`` = family default (gpt2: True and required; llama: False).
    - ``dropout``: gpt2 — embedding, attention and residual dropout (HF's embd/attn/resid_pdrop);
      llama — attention dropout (HF Llama has no other dropout).
    - ``pad_token_id``: for llama it is also the embedding's ``padding_idx`` (zero-initialised row that
      receives no gradient from the embedding lookup), as in transformers.
    """

    family: Literal["gpt2", "llama"] = "gpt2"
    vocab_size: int = 8192
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None
    d_ff: Optional[int] = None
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attention_bias: Optional[bool] = None
    qkv_bias: bool = False
    mlp_bias: Optional[bool] = None
    dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        # the family names this class declares: gpt2, llama, or a variant family's own (a subclass)
        names = get_args(get_type_hints(type(self))["family"])
        need(self.family in names, f"family={self.family!r} is not one of {', '.join(map(repr, names))}")
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        need(self.d_model % self.n_head == 0,
             f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        need(self.n_kv_head is None or (self.n_kv_head > 0 and self.n_head % self.n_kv_head == 0),
             f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        need(self.d_ff is None or self.d_ff > 0, f"d_ff={self.d_ff} must be positive")
        need(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be positive")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        need(self.initializer_range > 0, f"initializer_range={self.initializer_range} must be positive")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tid = getattr(self, name)
            need(tid is None or 0 <= tid < self.vocab_size,
                 f"{name}={tid} is outside the vocabulary [0, vocab_size={self.vocab_size})")
        if self.family == "gpt2":
            need(self.n_kv_head in (None, self.n_head),
                 f"n_kv_head={self.n_kv_head}: grouped-query attention needs family 'llama'")
            need(self.attention_bias in (None, True), "attention_bias=false: gpt2 always has attention biases")
            need(self.mlp_bias in (None, True), "mlp_bias=false: gpt2 always has MLP biases")
            need(not self.qkv_bias, "qkv_bias is a llama-family option (gpt2 always has biases)")
        else:
            need(self.head_dim % 2 == 0, f"head_dim d_model/n_head={self.head_dim} must be even for RoPE")
            need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive")
            need(not (self.qkv_bias and self.attention_bias),
                 "qkv_bias and attention_bias are both set; attention_bias already covers q, k, v (and o)")
            need(not (self.qkv_bias and self.mlp_bias),
                 "qkv_bias with mlp_bias has no Hugging Face equivalent (Qwen2 has no MLP bias)")

    # ---- resolved values -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.family == "gpt2":
            return 4 * self.d_model
        return -(-8 * self.d_model // (3 * 64)) * 64  # ceil(8d/3) rounded up to a multiple of 64

    @property
    def has_attention_bias(self) -> bool:
        return self.family == "gpt2" or bool(self.attention_bias)

    @property
    def has_mlp_bias(self) -> bool:
        return self.family == "gpt2" or bool(self.mlp_bias)

    # ---- Hugging Face config.json ----------------------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers reads (gpt2, llama, or qwen2 when ``qkv_bias``)."""
        return config_to_hf(self)

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "<dict>") -> "DecoderConfig":
        """From a transformers ``config.json`` dict (model_type gpt2, llama, qwen2, mistral); fields
        lmforge does not implement raise ``ModelError`` naming the field.  ``source`` names the file's
        directory in messages."""
        return config_from_hf(config, source)


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
