"""Decoder-only language models: GPT-2 and Llama flavours from one code base.

``DecoderLM(config)`` maps token ids to final hidden states; ``logits(hidden)`` applies the LM head.
Objectives compute losses (see :mod:`lmforge.models.heads`), loops drive optimisation.

Module tree (lmforge's own paths; leaf Linear names are Hugging Face's)::

    embed_tokens                       token embeddings (Embedding)
    embed_positions                    learned positions (gpt2 only)
    blocks.{i}.attn_norm               LayerNorm (gpt2) / RMSNorm (llama)
    blocks.{i}.attn.c_attn, .c_proj    gpt2: fused q|k|v, output projection
    blocks.{i}.attn.{q,k,v,o}_proj     llama
    blocks.{i}.mlp_norm
    blocks.{i}.mlp.c_fc, .c_proj       gpt2
    blocks.{i}.mlp.{gate,up,down}_proj llama
    norm                               final norm
    lm_head                            Linear, weight tied to embed_tokens when configured

``DecoderConfig`` (and its config.json form) is :mod:`lmforge.models.decoder_config`'s; :mod:`lmforge.models.hf`
holds the one name/layout map per family to and from HF checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.models.cache import KVCache
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.layers import (CausalSelfAttention, Embedding, GeluMLP, LayerNorm, Linear, RealTokens,
                                   RMSNorm, RotaryEmbedding, SwiGLUMLP, gpt2_residual_std, reset_children)
from lmforge.models.slots import (INPUT, PAST_KV, SIDE, PrefixCache, SideCache, SlotHost, prefilled, prepend,
                                  shifted_positions, with_leading_ones)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        std = c.initializer_range
        if c.architecture == "gpt2":
            out_std = gpt2_residual_std(std, c.n_layer)
            self.attn_norm = LayerNorm(c.d_model, eps=c.norm_eps)
            self.attn = CausalSelfAttention(c.d_model, c.n_head, c.n_head, layer_idx=layer_idx, fused=True,
                                            qkv_bias=True, out_bias=True, dropout=c.dropout, std=std,
                                            out_std=out_std)
            self.mlp_norm = LayerNorm(c.d_model, eps=c.norm_eps)
            self.mlp = GeluMLP(c.d_model, c.ffn_dim, bias=True, std=std, out_std=out_std)
            self.resid_dropout = c.dropout
        else:
            self.attn_norm = RMSNorm(c.d_model, eps=c.norm_eps)
            self.attn = CausalSelfAttention(c.d_model, c.n_head, c.kv_heads, layer_idx=layer_idx, fused=False,
                                            qkv_bias=c.has_attention_bias or c.qkv_bias,
                                            out_bias=c.has_attention_bias, dropout=c.dropout, std=std)
            self.mlp_norm = RMSNorm(c.d_model, eps=c.norm_eps)
            self.mlp = SwiGLUMLP(c.d_model, c.ffn_dim, bias=c.has_mlp_bias, std=std)
            self.resid_dropout = 0.0

    def reset_parameters(self) -> None:
        reset_children(self)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.resid_dropout > 0 and self.training:
            return nn.functional.dropout(x, self.resid_dropout, training=True)
        return x

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None, is_causal: bool, cache: KVCache | None = None,
                tokens: RealTokens | None = None) -> torch.Tensor:
        """``x [B, T, d]``, or ``[N, d]`` real tokens with ``tokens`` (see :class:`RealTokens`)."""
        x = x + self._drop(self.attn(self.attn_norm(x), rope, attn_mask, is_causal, cache, tokens))
        return x + self._drop(self.mlp(self.mlp_norm(x)))


class DecoderLM(SlotHost):
    """A decoder-only LM; ``forward`` returns final (normed) hidden states ``[B, T, d_model]``.

    Construction builds every module on the meta device, materialises it on ``device`` (default: the
    current default device) and runs :meth:`reset_parameters`, so an eager build and a meta build
    followed by ``to_empty(device=...)`` + ``reset_parameters()`` draw the same random numbers in the
    same order and are bitwise equal for the same seed.  Built under ``torch.device("meta")`` (or with
    ``device="meta"``) the model stays on meta, uninitialised.  Delta methods' slots: :mod:`lmforge.models.slots`.

    A variant family (its own ``DecoderConfig`` subclass) subclasses DecoderLM and sets ``block_class`` to a
    :class:`Block` of its own (e.g. another MLP); everything else is shared.
    """

    block_class: type[Block] = Block
    slot_kinds = (INPUT, PAST_KV, SIDE)
    skips_padding = True
    """``forward`` takes ``real_tokens`` (:func:`lmforge.objectives.logprobs.skip_padding` asks)."""

    def __init__(self, config: DecoderConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = c = config
        target = torch.device(device) if device is not None else torch.get_default_device()
        with torch.device("meta"):
            std = c.initializer_range
            pad = c.pad_token_id if c.architecture != "gpt2" else None
            self.embed_tokens = Embedding(c.vocab_size, c.d_model, padding_idx=pad, std=std)
            if c.architecture == "gpt2":
                self.embed_positions = Embedding(c.max_seq_len, c.d_model, std=std)
                self.rotary = None
            else:
                self.embed_positions = None
                self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta)
            self.blocks = nn.ModuleList(self.block_class(c, i) for i in range(c.n_layer))
            self.norm = LayerNorm(c.d_model, eps=c.norm_eps) if c.architecture == "gpt2" else RMSNorm(c.d_model, eps=c.norm_eps)
            self.lm_head = Linear(c.d_model, c.vocab_size, bias=False, std=std)
        self.embed_dropout = c.dropout if c.architecture == "gpt2" else 0.0
        self.activation_checkpointing = False
        self.tie_weights()
        if target.type != "meta":
            self.to_empty(device=target)
            self.reset_parameters()

    # ---- parameters ------------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share ``embed_tokens.weight`` with ``lm_head.weight`` when ``config.tie_embeddings`` (call it
        again after anything that re-creates parameters, e.g. ``to_empty``; ``reset_parameters`` does)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        """(Re)initialise every parameter as transformers does, walking modules in registration order
        (embeddings, blocks in order, final norm, LM head unless tied)."""
        self.tie_weights()
        for name, child in self.named_children():
            if name == "lm_head" and self.config.tie_embeddings:
                continue
            reset = getattr(child, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                reset_children(child)

    def set_pad_token_id(self, pad: int) -> None:
        """Set ``config.pad_token_id``; llama's embedding takes it as ``padding_idx`` too, as ``DecoderLM(config)``
        builds it (gpt2's has none)."""
        self.config.pad_token_id = pad
        if self.config.architecture != "gpt2":
            self.embed_tokens.padding_idx = pad

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (non-reentrant ``torch.utils.checkpoint``);
        only active in training mode with grad enabled and no KV cache."""
        self.activation_checkpointing = bool(enabled)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    # ---- inference helpers -----------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        c = self.config
        front, past_kv, side = self.slot(INPUT), self.slot(PAST_KV), self.slot(SIDE)
        extra = sum(s.n for s in (front, past_kv) if s is not None)  # their keys/values are cached too
        cache = KVCache(c.n_layer, batch_size, c.kv_heads, c.head_dim, max_len + extra,
                        dtype=dtype or self.dtype, device=device or self.device)
        if past_kv is not None:
            cache = prefilled(cache, past_kv, batch_size)
        if side is not None:  # the side network attends over the past too
            cache = SideCache(cache, side.new_cache(batch_size, max_len, dtype or self.dtype, device or self.device))
        return cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, real_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids [B, T]`` (or ``inputs_embeds [B, T, d]``) -> hidden ``[B, T, d]``.

        ``attention_mask [B, past + T]``: 1 = real token, 0 = padding (left padding for decoding).  With
        a mask and no ``position_ids``, positions are ``cumsum(mask) - 1`` clamped at 0, so a left-padded
        prompt sees the same positions as unpadded.  With ``cache``, ``cache.length`` positions are
        already stored; this call appends ``T`` and advances the cache.  Pass no mask when there is no
        padding: that takes SDPA's ``is_causal`` fast path.  With an ``input`` or ``past_kv`` slot filled, masks and
        positions given are the real tokens'; with a ``side`` network the blocks run without a graph and the side
        network adds its part (:mod:`lmforge.models.slots`).  A 4-D boolean ``attention_mask [B, 1, T, T]`` (True =
        attend) is used as it is, with the ``position_ids`` given: packed sequences (:mod:`lmforge.objectives.sft`).

        ``real_tokens [B, T]`` (1 = a position whose output is read; no cache and no slot filled, else ignored): the
        blocks' token-wise layers run on those positions only (:class:`~lmforge.models.layers.RealTokens`) and the
        other positions of the output are zeros, not what a full pass computes there.  For losses that never read
        padding (SFT, DPO, rewards at the last real token), given the padding mask: the real positions' outputs equal
        the full pass's.  Attention still masks as ``attention_mask`` says, so the positions left out must be ones
        no kept position attends to (padding).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        # packed rows (SFT): the caller's own [B, 1, T, T] mask (block-diagonal causal) and restarted positions
        packed = attention_mask is not None and attention_mask.dim() == 4
        if packed and (position_ids is None or cache is not None or self.slot(PAST_KV) is not None
                       or self.slot(INPUT) is not None):
            raise ValueError("a [batch, 1, T, T] attention mask needs position_ids, no cache and no prompt/prefix")
        side_cache = None
        if isinstance(cache, SideCache):
            cache, side_cache = cache.main, cache.side
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        past_kv = self.slot(PAST_KV)
        if past_kv is not None:  # a cache already n positions long (prefilled by new_cache)
            if cache is None:
                cache = PrefixCache(past_kv(x.shape[0], x.dtype))
            attention_mask = with_leading_ones(attention_mask, past_kv.n)
            if position_ids is not None:
                position_ids = position_ids + past_kv.n
        past = cache.length if cache is not None else 0
        front = self.slot(INPUT)
        in_front = front is not None and past == 0  # once cached, the vectors' keys/values are in the cache
        if front is not None:
            attention_mask = with_leading_ones(attention_mask, front.n)
            if position_ids is not None:
                position_ids = shifted_positions(position_ids, front.n, with_front=in_front)
            if in_front:
                x = prepend(front, x)
        B, T = x.shape[:2]
        S = past + T
        if attention_mask is not None and not packed and tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [batch, past + "
                             f"new tokens] = [{B}, {S}] (cache holds {past} positions)")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
                if past:
                    position_ids = position_ids[:, past:]
            else:
                position_ids = torch.arange(past, S, device=x.device)[None]
        c = self.config
        rope = None
        if c.architecture == "gpt2":
            if S > c.max_seq_len:
                raise ValueError(f"sequence of {S} positions exceeds the model's max_seq_len={c.max_seq_len}")
            x = x + self.embed_positions(position_ids)
            if self.embed_dropout > 0 and self.training:
                x = nn.functional.dropout(x, self.embed_dropout, training=True)
        else:
            rope = self.rotary(position_ids, x.dtype)
        attn_mask, is_causal = _attention_mask(attention_mask, past, T, x.device)
        side = self.slot(SIDE)
        if side is not None:
            x = self._beside(side, x, rope, attn_mask, is_causal, cache, side_cache, position_ids)
        else:
            use_ckpt = (self.activation_checkpointing and self.training and torch.is_grad_enabled()
                        and (cache is None or isinstance(cache, PrefixCache)))  # a prefix cache stores nothing
            tokens = None
            if real_tokens is not None and cache is None and front is None and past_kv is None:
                tokens = RealTokens(real_tokens)
                x = tokens.gather(x)
            for block in self.blocks:
                if use_ckpt:
                    x = checkpoint(block, x, rope, attn_mask, is_causal, cache, tokens, use_reentrant=False)
                else:
                    x = block(x, rope, attn_mask, is_causal, cache, tokens)
            if cache is not None:
                cache.advance(T)
            x = self.norm(x)
            if tokens is not None:
                x = tokens.scatter(x)
        return x[:, front.n:] if in_front else x

    def _beside(self, side: nn.Module, x: torch.Tensor, rope: Any, attn_mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None, side_cache: KVCache | None, position_ids: torch.Tensor) -> torch.Tensor:
        """The frozen blocks without a graph, collecting each block's input and output; then the side network."""
        T = x.shape[1]
        with torch.no_grad():
            hiddens = [x]
            for block in self.blocks:
                x = block(x, rope, attn_mask, is_causal, cache)
                hiddens.append(x)
            final = self.norm(x)
        out = side(hiddens, final, lambda blk, s, side_rope: blk(s, side_rope, attn_mask, is_causal, side_cache),
                   position_ids)
        for c in (cache, side_cache):
            if c is not None:
                c.advance(T)
        return out


def _attention_mask(attention_mask: torch.Tensor | None, past: int, T: int,
                    device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """Boolean SDPA mask (True = attend) ``[B, 1, T, past + T]`` or ``[T, past + T]``, and ``is_causal``.

    Without padding: SDPA's ``is_causal`` when queries and keys start together, no mask at all for a
    single decoded token, else an offset causal mask.  With padding a query also always sees itself, so
    a padding query never has an empty row (which would give NaN and leak through the values).
    """
    S = past + T
    if attention_mask is not None and attention_mask.dim() == 4:  # already [B, 1, T, S] booleans
        return attention_mask, False
    if attention_mask is None:
        if past == 0:
            return None, T > 1
        if T == 1:
            return None, False
        q_pos = torch.arange(past, S, device=device)[:, None]
        return torch.arange(S, device=device)[None, :] <= q_pos, False
    if T == 1:  # one decoded token: every stored key is in its past
        mask = attention_mask[:, None, None, :] != 0  # a new tensor, so the in-place edit is safe
        mask[..., -1] = True
        return mask, False
    q_pos = torch.arange(past, S, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(S, device=device)[None, :]  # [1, S]
    real = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
    mask = ((k_pos <= q_pos) & real) | (k_pos == q_pos)
    return mask, False
