"""``EncoderConfig``, the architecture of an encoder-only LM (BERT), and its Hugging Face ``config.json`` form.

The config.json mapping lives with the config (``EncoderConfig.from_hf`` / ``to_hf``), so the checkpoint code in
:mod:`lmforge.models.hf_bert` imports the config and never the reverse.  Fields lmforge does not implement are
refused by name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional

from lmforge.core.errors import ModelError
from lmforge.models.layers import need


@dataclass
class EncoderConfig:
    """Architecture of an encoder-only LM (the ``model:`` section of a run config for ``family: bert``).

    - ``d_ff``: MLP width (HF ``intermediate_size``); ``None`` = ``4 * d_model``.
    - ``max_seq_len``: rows of the learned position table (HF ``max_position_embeddings``).
    - ``type_vocab_size``: segment ids (2: sentence A / B).
    - ``dropout``: embedding and residual dropout (HF ``hidden_dropout_prob``); ``attention_dropout``:
      dropout on attention probabilities (HF ``attention_probs_dropout_prob``).  BERT's 0.1 by default.
    - ``norm_eps``: LayerNorm epsilon (BERT's 1e-12).
    - ``tie_embeddings``: the MLM decoder shares ``word_embeddings.weight`` (BERT always does).
    - ``pad_token_id``: the embedding's ``padding_idx`` (zero-initialised row without gradient), as in
      transformers; ``None`` = no padding row.
    """

    family: Literal["bert"] = "bert"
    vocab_size: int = 8192
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_ff: Optional[int] = None
    max_seq_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    tie_embeddings: bool = True
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        need(self.family == "bert", f"family={self.family!r} is not 'bert'")
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_seq_len", "type_vocab_size"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        need(self.d_model % self.n_head == 0, f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        need(self.d_ff is None or self.d_ff > 0, f"d_ff={self.d_ff} must be positive")
        need(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be positive")
        for name in ("dropout", "attention_dropout"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name}={getattr(self, name)} must be in [0, 1)")
        need(self.initializer_range > 0, f"initializer_range={self.initializer_range} must be positive")
        need(self.pad_token_id is None or 0 <= self.pad_token_id < self.vocab_size,
             f"pad_token_id={self.pad_token_id} is outside the vocabulary [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers reads (model_type ``bert``)."""
        return config_to_hf(self)

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "<dict>") -> "EncoderConfig":
        """From a transformers ``config.json`` dict (model_type ``bert``); unsupported fields raise
        ``ModelError`` naming the field."""
        return config_from_hf(config, source)


# ---- config.json ---------------------------------------------------------------------------------

# transformers' BertConfig defaults for fields a config.json may leave out
_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, is_decoder=False,
    add_cross_attention=False, tie_word_embeddings=True, position_embedding_type="absolute")
_ACTS = ("gelu", "gelu_python")  # both the exact erf GELU


def config_from_hf(hf: dict[str, Any], source: str = "<dict>") -> EncoderConfig:
    """EncoderConfig from a transformers BERT config dict; anything lmforge does not implement is refused."""
    where = f"config.json of '{source}'"
    if not isinstance(hf, dict):
        raise ModelError(f"{where} is not a JSON object")
    if hf.get("model_type") != "bert":
        raise ModelError(f"{where}: model_type {hf.get('model_type')!r} is not 'bert'")
    cfg = {**_HF_DEFAULTS, **hf}

    def require(field: str, ok, supported: str) -> None:
        if field in cfg and not ok(cfg[field]):
            raise ModelError(f"{where}: field '{field}' = {cfg[field]!r} is not supported by lmforge "
                             f"(supported: {supported}); use a checkpoint without it")

    require("position_embedding_type", lambda v: v in (None, "absolute"), "'absolute'")
    require("is_decoder", lambda v: not v, "false")
    require("add_cross_attention", lambda v: not v, "false")
    require("is_encoder_decoder", lambda v: not v, "false")
    require("hidden_act", lambda v: v in _ACTS, ", ".join(_ACTS))
    require("pruned_heads", lambda v: not v, "none")
    require("quantization_config", lambda v: v is None, "null")
    require("embedding_size", lambda v: v in (None, cfg["hidden_size"]), "equal to hidden_size")
    require("tie_word_embeddings", lambda v: isinstance(v, bool), "true, false")
    pad = cfg.get("pad_token_id")
    if pad is not None and not (isinstance(pad, int) and 0 <= pad < int(cfg["vocab_size"])):
        warnings.warn(f"{where}: pad_token_id={pad!r} is outside the vocabulary; ignored", stacklevel=3)
        pad = None
    try:
        return EncoderConfig(
            vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"],
            n_head=cfg["num_attention_heads"], d_ff=cfg["intermediate_size"],
            max_seq_len=cfg["max_position_embeddings"], type_vocab_size=cfg["type_vocab_size"],
            norm_eps=float(cfg["layer_norm_eps"]), dropout=float(cfg["hidden_dropout_prob"]),
            attention_dropout=float(cfg["attention_probs_dropout_prob"]),
            initializer_range=float(cfg.get("initializer_range") or 0.02),
            tie_embeddings=cfg["tie_word_embeddings"], pad_token_id=pad)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: {e}") from None


def config_to_hf(config: EncoderConfig) -> dict[str, Any]:
    """The transformers config.json dict for ``config`` (without dtype, which depends on the weights)."""
    c = config
    return dict(architectures=["BertForPreTraining"], model_type="bert", vocab_size=c.vocab_size,
                hidden_size=c.d_model, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                intermediate_size=c.ffn_dim, hidden_act="gelu", hidden_dropout_prob=c.dropout,
                attention_probs_dropout_prob=c.attention_dropout, max_position_embeddings=c.max_seq_len,
                type_vocab_size=c.type_vocab_size, initializer_range=c.initializer_range,
                layer_norm_eps=c.norm_eps, pad_token_id=c.pad_token_id, position_embedding_type="absolute",
                is_decoder=False, add_cross_attention=False, tie_word_embeddings=c.tie_embeddings,
                classifier_dropout=None, use_cache=True)
