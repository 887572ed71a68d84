"""Encoder-only masked LMs: BERT.

``EncoderLM(config)`` maps token ids (+ segment ids and a padding mask) to final hidden states;
``pooled``, ``mlm_logits`` and ``nsp_logits`` apply the pooler and the two pretraining heads.
Objectives compute losses (see :mod:`lmforge.objectives.mlm`), loops drive optimisation.

Module tree (lmforge's own paths; every leaf name and module boundary below ``blocks.{i}`` is Hugging
Face's, so delta-method patterns such as ``query`` or ``attention.output.dense`` work unchanged)::

    embeddings.word_embeddings               token embeddings (padding row = pad_token_id)
    embeddings.position_embeddings           learned absolute positions
    embeddings.token_type_embeddings         segment A/B embeddings
    embeddings.LayerNorm                     applied to the sum, then dropout
    blocks.{i}.attention.self.{query,key,value}
    blocks.{i}.attention.output.{dense,LayerNorm}   post-LN: LN(x + dense(attn))
    blocks.{i}.intermediate.dense            d -> d_ff, exact (erf) GELU
    blocks.{i}.output.{dense,LayerNorm}      post-LN: LN(h + dense(gelu(...)))
    pooler.dense                             tanh(dense(hidden[:, 0])) -- the [CLS] summary
    predictions.transform.{dense,LayerNorm}  MLM head transform (dense, GELU, LayerNorm)
    predictions.decoder                      Linear d -> vocab; weight tied to word_embeddings, own bias
    seq_relationship                         NSP head, 2 classes (0 = IsNext, 1 = random, as HF)

The pooler and both heads always exist (as in ``BertForPreTraining``), also when a run trains without
NSP: the model directory then still loads in every HF BERT class.  ``EncoderConfig`` (and its config.json form)
is :mod:`lmforge.models.encoder_config`'s; :mod:`lmforge.models.hf_bert` holds the one name map to and from HF
checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.models.encoder_config import EncoderConfig
from lmforge.models.layers import Embedding, LayerNorm, Linear, reset_children
from lmforge.models.slots import INPUT, PAST_KV, SIDE, SlotHost, prepend, shifted_positions, with_leading_ones


# ---- modules (HF's boundaries and leaf names) ----------------------------------------------------

class _Resettable(nn.Module):
    """A container whose initialisation is its children's, in registration order."""

    def reset_parameters(self) -> None:
        reset_children(self)


class Embeddings(_Resettable):
    """``LayerNorm(word + token_type + position)`` then dropout (HF ``BertEmbeddings``)."""

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        std = c.initializer_range
        self.word_embeddings = Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_token_id, std=std)
        self.position_embeddings = Embedding(c.max_seq_len, c.d_model, std=std)
        self.token_type_embeddings = Embedding(c.type_vocab_size, c.d_model, std=std)
        self.LayerNorm = LayerNorm(c.d_model, eps=c.norm_eps)
        self.dropout = c.dropout

    def forward(self, input_ids: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                position_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, d]
        if token_type_ids is None:  # all segment A: row 0 of the table, broadcast
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return F.dropout(self.LayerNorm(x), self.dropout, self.training)


class SelfAttention(_Resettable):
    """Bidirectional multi-head attention through SDPA (HF ``BertSelfAttention``: ``query``, ``key``,
    ``value``); returns the heads' concatenated context ``[B, T, d]`` before the output projection."""

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        std = c.initializer_range
        self.n_head, self.head_dim = c.n_head, c.head_dim
        self.query = Linear(c.d_model, c.d_model, std=std)
        self.key = Linear(c.d_model, c.d_model, std=std)
        self.value = Linear(c.d_model, c.d_model, std=std)
        self.dropout = c.attention_dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
                   for lin in (self.query, self.key, self.value))
        if prefix is not None:  # prefix tuning: n more keys/values in front, [B, H, n, D]
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)


class DenseLayerNorm(_Resettable):
    """``LayerNorm(residual + dropout(dense(h)))`` -- HF ``BertSelfOutput`` and ``BertOutput`` (post-LN)."""

    def __init__(self, d_in: int, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(d_in, c.d_model, std=c.initializer_range)
        self.LayerNorm = LayerNorm(c.d_model, eps=c.norm_eps)
        self.dropout = c.dropout

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + F.dropout(self.dense(h), self.dropout, self.training))


class Attention(_Resettable):
    """HF ``BertAttention``: ``self`` (q/k/v + SDPA) and ``output`` (dense + residual + LayerNorm)."""

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseLayerNorm(c.d_model, c)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.output(self.self(x, attn_mask, prefix), x)


class Intermediate(_Resettable):
    """HF ``BertIntermediate``: ``gelu(dense(x))`` with the exact (erf) GELU."""

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(c.d_model, c.ffn_dim, std=c.initializer_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class EncoderBlock(_Resettable):
    """One post-LN transformer layer (HF ``BertLayer``): attention, then the MLP, each with its own
    residual LayerNorm."""

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseLayerNorm(c.ffn_dim, c)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.attention(x, attn_mask, prefix)
        return self.output(self.intermediate(x), x)


class Pooler(_Resettable):
    """``tanh(dense(hidden[:, 0]))``: the [CLS] position's summary (HF ``BertPooler``)."""

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(c.d_model, c.d_model, std=c.initializer_range)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class HeadTransform(_Resettable):
    """``LayerNorm(gelu(dense(h)))`` before the MLM decoder (HF ``BertPredictionHeadTransform``)."""

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(c.d_model, c.d_model, std=c.initializer_range)
        self.LayerNorm = LayerNorm(c.d_model, eps=c.norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(h)))


class MLMHead(nn.Module):
    """HF ``BertLMPredictionHead``: ``decoder(transform(h))``.  ``decoder`` is a plain Linear with bias
    (HF's ``cls.predictions.bias``); its weight is the word embedding when tied, so resetting it only
    zeroes the bias (the embedding owns the weight's initialisation)."""

    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()
        self.tied = c.tie_embeddings
        self.transform = HeadTransform(c)
        self.decoder = Linear(c.d_model, c.vocab_size, bias=True, std=c.initializer_range)

    def reset_parameters(self) -> None:
        self.transform.reset_parameters()
        if self.tied:
            nn.init.zeros_(self.decoder.bias)
        else:
            self.decoder.reset_parameters()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(h))


# ---- the model -----------------------------------------------------------------------------------

class EncoderLM(SlotHost):
    """A BERT encoder with pooler and pretraining heads; ``forward`` returns hidden ``[B, T, d_model]``.

    Construction builds every module on the meta device, materialises it on ``device`` (default: the
    current default device) and runs :meth:`reset_parameters`, so an eager build equals a meta build +
    ``to_empty(device=...)`` + ``reset_parameters()`` bitwise for the same seed.  Built under
    ``torch.device("meta")`` (or with ``device="meta"``) the model stays on meta, uninitialised.  Delta methods'
    slots: :mod:`lmforge.models.slots`.
    """

    slot_kinds = (INPUT, PAST_KV, SIDE)

    def __init__(self, config: EncoderConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = c = config
        target = torch.device(device) if device is not None else torch.get_default_device()
        with torch.device("meta"):
            self.embeddings = Embeddings(c)
            self.blocks = nn.ModuleList(EncoderBlock(c) for _ in range(c.n_layer))
            self.pooler = Pooler(c)
            self.predictions = MLMHead(c)
            self.seq_relationship = Linear(c.d_model, 2, std=c.initializer_range)
        self.activation_checkpointing = False
        self.tie_weights()
        if target.type != "meta":
            self.to_empty(device=target)
            self.reset_parameters()

    # ---- parameters ------------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share ``word_embeddings.weight`` with ``predictions.decoder.weight`` when ``tie_embeddings``
        (call again after anything that re-creates parameters; ``reset_parameters`` does)."""
        if self.config.tie_embeddings:
            self.predictions.decoder.weight = self.embeddings.word_embeddings.weight

    def reset_parameters(self) -> None:
        """(Re)initialise every parameter as transformers does (N(0, initializer_range) weights, zero
        biases and padding row, unit LayerNorms), in registration order."""
        self.tie_weights()
        reset_children(self)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (non-reentrant ``torch.utils.checkpoint``);
        only active in training mode with grad enabled."""
        self.activation_checkpointing = bool(enabled)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    # ---- forward and heads -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, keep_prompt: bool = False) -> torch.Tensor:
        """``input_ids [B, T]`` (or ``inputs_embeds [B, T, d]``) -> hidden ``[B, T, d]``.

        ``attention_mask [B, T]``: 1 = real token, 0 = padding (keys at padding are never attended; pass
        ``None`` when there is none: SDPA then needs no mask).  ``token_type_ids [B, T]``: segment ids
        (default all 0).  ``position_ids``: default ``0..T-1`` for every row, as transformers does.  With the
        ``input`` slot filled the inputs are the real tokens' and so is the output, unless ``keep_prompt`` (``[B, n +
        T, d]``, for the pooler: :mod:`lmforge.models.slots`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [{B}, {T}]")
        if position_ids is None:
            position_ids = torch.arange(T, device=self.device)[None]  # [1, T]
        front = self.slot(INPUT)
        if front is not None:  # the vectors get positions 0..n-1 and segment 0, as words would
            if inputs_embeds is None:
                inputs_embeds, input_ids = self.embeddings.word_embeddings(input_ids), None
            inputs_embeds = prepend(front, inputs_embeds)
            attention_mask = with_leading_ones(attention_mask, front.n)
            position_ids = shifted_positions(position_ids, front.n, with_front=True)
            if token_type_ids is not None:
                token_type_ids = torch.cat([token_type_ids.new_zeros(B, front.n), token_type_ids], dim=1)
        S = position_ids.shape[1]
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence of {S} positions exceeds the model's max_seq_len={self.config.max_seq_len}")
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        prefixes = [None] * len(self.blocks)
        past_kv = self.slot(PAST_KV)
        if past_kv is not None:  # every layer attends to its n extra keys/values too
            prefixes, attention_mask = past_kv(B, x.dtype), with_leading_ones(attention_mask, past_kv.n)
        attn_mask = padding_mask(attention_mask)
        side = self.slot(SIDE)
        if side is not None:  # frozen blocks without a graph, then the side network on their states
            with torch.no_grad():
                hiddens = [x]
                for block, kv in zip(self.blocks, prefixes):
                    x = block(x, attn_mask, kv)
                    hiddens.append(x)
            x = side(hiddens, x, lambda blk, s, rope: blk(s, attn_mask), position_ids)
        else:
            use_ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
            for block, kv in zip(self.blocks, prefixes):
                x = checkpoint(block, x, attn_mask, kv, use_reentrant=False) if use_ckpt else block(x, attn_mask, kv)
        return x if front is None or keep_prompt else x[:, front.n:]

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` -> ``[B, d]``: ``tanh(pooler.dense(hidden[:, 0]))``."""
        return self.pooler(hidden)

    def mlm_logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """MLM logits: ``[B, T, V]`` for all positions, or ``[N, V]`` only where the bool mask
        ``positions [B, T]`` is True (row-major order), so the vocabulary projection runs on the ~15%
        of positions that carry a target and not on all of them."""
        if positions is not None:
            hidden = hidden[positions]  # [N, d]
        return self.predictions(hidden)

    def nsp_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, d]`` -> ``[B, 2]`` next-sentence logits (class 0 = IsNext, 1 = NotNext)."""
        return self.seq_relationship(pooled)


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, T]`` 1/0 mask -> boolean SDPA key mask ``[B, 1, 1, T]`` (True = attend), or ``None``.

    A row without any real token attends to all of its positions instead of none: an all-False row
    would give NaN in SDPA, and its outputs are padding anyway.
    """
    if attention_mask is None:
        return None
    real = attention_mask.bool()
    real = real | ~real.any(dim=-1, keepdim=True)
    return real[:, None, None, :]
