"""T5's configuration and layers: RMS norm, relative-position buckets, attention (self or cross, with its KV cache
and optional prefix), the ReLU / gated-GELU feed-forward, the pre-norm block and the stack of blocks.

:class:`lmforge.models.encdec.EncoderDecoderLM` assembles two stacks, the shared embedding and the head; its
docstring gives the module tree and what sets T5's attention apart from GPT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.models.cache import KVCache
from lmforge.models.layers import Embedding, Linear, need, reset_children
from lmforge.models.slots import PrefixCache


@dataclass
class T5Config:
    """Architecture of a T5 model (the ``model:`` section of a run config); field names are HF's but ``dropout``.

    - ``feed_forward_proj``: ``relu`` (T5 v1.0: ``wo(relu(wi(x)))``) or ``gated-gelu`` (v1.1:
      ``wo(gelu_tanh(wi_0(x)) * wi_1(x))``).
    - ``tie_word_embeddings``: LM head shares ``shared.weight``.  ``None`` = the variant's default (v1.0 tied,
      v1.1 untied).
    - ``scale_decoder_outputs``: multiply the decoder output by ``d_model ** -0.5`` before the head.  ``None`` =
      same as the tie (what transformers does: original T5 ties and rescales, v1.1 does neither).
    - ``d_kv``: per-head width; ``num_heads * d_kv`` need not equal ``d_model``.
    - ``num_decoder_layers``: ``None`` = ``num_layers``.
    - ``dropout``: HF's ``dropout_rate`` (embeddings, attention probabilities, MLP hidden, residual branches,
      final norm outputs).
    - ``initializer_factor``: scales every init std (HF's ``initializer_factor``).
    - ``decoder_start_token_id``: first decoder input; ``None`` = ``pad_token_id`` (the T5 convention).
    """

    family: Literal["t5"] = "t5"
    vocab_size: int = 8192
    d_model: int = 256
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 4
    num_decoder_layers: Optional[int] = None
    num_heads: int = 4
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: Literal["relu", "gated-gelu"] = "relu"
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: Optional[bool] = None
    scale_decoder_outputs: Optional[bool] = None
    initializer_factor: float = 1.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        need(self.family == "t5", f"family={self.family!r} is not 't5'")
        need(self.feed_forward_proj in ("relu", "gated-gelu"),
             f"feed_forward_proj={self.feed_forward_proj!r} is not one of 'relu', 'gated-gelu'")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        for name in ("num_decoder_layers", "layer_norm_epsilon", "initializer_factor"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name}={value} must be positive")
        need(self.relative_attention_num_buckets >= 4,
             f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            tid = getattr(self, name)
            need(tid is None or 0 <= tid < self.vocab_size,
                 f"{name}={tid} is outside the vocabulary [0, vocab_size={self.vocab_size})")

    # ---- resolved values -------------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @property
    def tied(self) -> bool:
        return (not self.gated) if self.tie_word_embeddings is None else bool(self.tie_word_embeddings)

    @property
    def scales_output(self) -> bool:
        return self.tied if self.scale_decoder_outputs is None else bool(self.scale_decoder_outputs)

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def start_token_id(self) -> int:
        return self.pad_token_id if self.decoder_start_token_id is None else self.decoder_start_token_id


# ---- building blocks -------------------------------------------------------------------------------

class T5LayerNorm(nn.Module):
    """RMS norm: ``weight * x / sqrt(mean(x^2) + eps)``, no mean subtraction, no bias; the mean of squares is
    taken in fp32 (as HF does) and the weight starts at ``initializer_factor``."""

    def __init__(self, dim: int, eps: float = 1e-6, factor: float = 1.0) -> None:
        super().__init__()
        self.eps = eps
        self.factor = factor
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each distance ``key_pos - query_pos`` (Mesh TensorFlow's scheme, as in T5).

    Half the buckets (per direction when bidirectional) hold the exact small distances ``0..exact-1``; the rest
    cover ``[exact, max_distance)`` on a log scale, and everything farther shares the last bucket.  In the
    causal (decoder) case only keys at or before the query count; future keys fall in bucket 0 (masked anyway).
    """
    rel = relative_position
    if bidirectional:
        num_buckets //= 2
        base = (rel > 0).long() * num_buckets  # keys after the query use the upper half
        dist = rel.abs()
    else:
        base = torch.zeros_like(rel)
        dist = (-rel).clamp(min=0)
    exact = num_buckets // 2
    # clamp(min=1) only avoids log(0); those distances take the exact branch below.
    log_scaled = (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                  * (num_buckets - exact)).long()
    far = (exact + log_scaled).clamp(max=num_buckets - 1)
    return base + torch.where(dist < exact, dist, far)


def padding_bias(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """``[B, S]`` (1 = real token) -> additive ``[B, 1, 1, S]`` (0 / most negative float); None stays None."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _as_attn_mask(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """SDPA wants the additive mask in the query dtype (the autocast dtype when autocast is on, else ``x``'s);
    masked entries stay finite after the cast, so no row becomes NaN."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if bias is None or bias.dtype == dtype:
        return bias
    return bias.to(dtype).clamp(min=torch.finfo(dtype).min)


class T5Attention(nn.Module):
    """Pre-norm attention sublayer ``x + o(attention(layer_norm(x)))``, self- or cross-attention.

    Scores are ``q @ k^T + bias`` with no ``1/sqrt(d_kv)`` scaling; ``bias`` (``[B or 1, H, T, S]``) carries
    the relative position bias and the padding/causal mask.
    """

    def __init__(self, c: T5Config, layer_idx: int, cross: bool = False) -> None:
        super().__init__()
        f, d, inner = c.initializer_factor, c.d_model, c.inner_dim
        self.layer_idx, self.cross = layer_idx, cross
        self.n_heads, self.d_kv, self.dropout = c.num_heads, c.d_kv, c.dropout
        self.layer_norm = T5LayerNorm(d, c.layer_norm_epsilon, f)
        self.q = Linear(d, inner, bias=False, std=f * (d * c.d_kv) ** -0.5)
        self.k = Linear(d, inner, bias=False, std=f * d ** -0.5)
        self.v = Linear(d, inner, bias=False, std=f * d ** -0.5)
        self.o = Linear(inner, d, bias=False, std=f * inner ** -0.5)

    def reset_parameters(self) -> None:
        reset_children(self)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.n_heads, self.d_kv).transpose(1, 2)  # [B, H, T, D]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, enc: torch.Tensor | None = None,
                cache: "EncDecCache | None" = None) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.layer_norm(x)
        q = self._heads(self.q(h))
        if self.cross:  # keys/values from the encoder output: computed once per generation, then reused
            kv = cache.cross[self.layer_idx] if cache is not None else None
            if kv is None:
                kv = (self._heads(self.k(enc)), self._heads(self.v(enc)))
                if cache is not None:
                    cache.cross[self.layer_idx] = kv
            k, v = kv
        else:
            k, v = self._heads(self.k(h)), self._heads(self.v(h))
            if cache is not None:
                k, v = cache.self_attn.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_kv))
        return x + _dropout(y, self.dropout, self.training)


class T5FeedForward(nn.Module):
    """Pre-norm MLP sublayer ``x + wo(act(wi(layer_norm(x))))``; gated: ``wo(gelu(wi_0(h)) * wi_1(h))``."""

    def __init__(self, c: T5Config) -> None:
        super().__init__()
        f, d = c.initializer_factor, c.d_model
        self.gated, self.dropout = c.gated, c.dropout
        self.layer_norm = T5LayerNorm(d, c.layer_norm_epsilon, f)
        if self.gated:
            self.wi_0 = Linear(d, c.d_ff, bias=False, std=f * d ** -0.5)
            self.wi_1 = Linear(d, c.d_ff, bias=False, std=f * d ** -0.5)
        else:
            self.wi = Linear(d, c.d_ff, bias=False, std=f * d ** -0.5)
        self.wo = Linear(c.d_ff, d, bias=False, std=f * c.d_ff ** -0.5)

    def reset_parameters(self) -> None:
        reset_children(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm(x)
        if self.gated:
            h = F.gelu(self.wi_0(h), approximate="tanh") * self.wi_1(h)  # HF's gelu_new
        else:
            h = F.relu(self.wi(h))
        h = self.wo(_dropout(h, self.dropout, self.training))
        return x + _dropout(h, self.dropout, self.training)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training=True) if p > 0 and training else x


class T5Block(nn.Module):
    """Self-attention, then (decoder only) cross-attention, then the MLP; each a residual sublayer."""

    def __init__(self, c: T5Config, layer_idx: int, is_decoder: bool) -> None:
        super().__init__()
        self.self_attn = T5Attention(c, layer_idx)
        self.cross_attn = T5Attention(c, layer_idx, cross=True) if is_decoder else None
        self.ff = T5FeedForward(c)

    def reset_parameters(self) -> None:
        reset_children(self)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, enc: torch.Tensor | None = None,
                enc_bias: torch.Tensor | None = None, cache: "EncDecCache | None" = None) -> torch.Tensor:
        x = self.self_attn(x, bias, cache=cache)
        if self.cross_attn is not None:
            x = self.cross_attn(x, enc_bias, enc=enc, cache=cache)
        return self.ff(x)


class T5Stack(nn.Module):
    """The encoder (bidirectional position buckets) or the decoder (causal buckets + mask, cross-attention)."""

    def __init__(self, c: T5Config, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        self.num_buckets, self.max_distance = c.relative_attention_num_buckets, c.relative_attention_max_distance
        self.dropout = c.dropout
        self.relative_attention_bias = Embedding(c.relative_attention_num_buckets, c.num_heads,
                                                 std=c.initializer_factor * c.d_model ** -0.5)
        n = c.decoder_layers if is_decoder else c.num_layers
        self.blocks = nn.ModuleList(T5Block(c, i, is_decoder) for i in range(n))
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon, c.initializer_factor)
        self.activation_checkpointing = False

    def reset_parameters(self) -> None:
        reset_children(self)

    def position_bias(self, q_len: int, k_len: int, past: int, device: torch.device) -> torch.Tensor:
        """``[1, H, q_len, k_len]`` bias for queries at ``past .. past + q_len - 1`` and keys ``0 .. k_len - 1``."""
        q_pos = torch.arange(past, past + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(k_pos - q_pos, not self.is_decoder, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor | None, enc: torch.Tensor | None = None,
                enc_bias: torch.Tensor | None = None, cache: "EncDecCache | None" = None) -> torch.Tensor:
        """``x [B, T, d]`` embeddings -> normed hidden states.  ``self_bias``: padding mask (encoder) or causal
        mask (decoder) as additive ``[B or 1, 1, T, S]``, or None; the position bias is added here."""
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        bias = self.position_bias(T, past + T, past, x.device)
        if self_bias is not None:
            bias = bias + self_bias
        bias, enc_bias = _as_attn_mask(bias, x), _as_attn_mask(enc_bias, x)
        x = _dropout(x, self.dropout, self.training)
        # a prefix cache stores nothing, and cross keys/values it holds are recomputed identically: checkpointable
        prefix_only = cache is not None and isinstance(cache.self_attn, PrefixCache)
        use_ckpt = (self.activation_checkpointing and self.training and torch.is_grad_enabled()
                    and (cache is None or prefix_only))
        for block in self.blocks:
            if use_ckpt:
                x = checkpoint(block, x, bias, enc, enc_bias, cache, use_reentrant=False)
            else:
                x = block(x, bias, enc, enc_bias, cache)
        return _dropout(self.final_layer_norm(x), self.dropout, self.training)


class EncDecCache:
    """Decoding state of an :class:`EncoderDecoderLM`.

    ``self_attn``: a static :class:`KVCache` of the decoder's self-attention keys/values (``[B, H, max_len,
    d_kv]`` per layer; all rows share one write position, the decoder inputs are never padded).
    ``cross[i]``: layer ``i``'s cross-attention keys/values ``[B, H, S, d_kv]``, computed from the encoder
    output on the first decode call and reused afterwards (the encoder output never changes).
    """

    def __init__(self, self_attn: KVCache, n_layers: int) -> None:
        self.self_attn = self_attn
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return self.self_attn.length

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/duplicate rows ``index`` of every cached tensor (drop finished rows, beam search)."""
        self.self_attn.reorder(index)
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.cross]

    def reset(self) -> None:
        self.self_attn.reset()
        self.cross = [None] * len(self.cross)
