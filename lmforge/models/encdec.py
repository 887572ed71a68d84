"""Encoder-decoder language models: T5 v1.0 (ReLU MLP, tied and rescaled head) and v1.1 (gated GELU,
untied head) from one code base.

``EncoderDecoderLM(config)``: ``encode(input_ids, attention_mask) -> enc_hidden``, ``decode(decoder_input_ids,
enc_hidden, enc_mask, cache) -> dec_hidden``, ``logits(dec_hidden)``.  ``decode`` returns exactly what the LM
head consumes: final RMS norm, dropout and -- when ``config.scales_output`` (v1.0) -- the ``d_model ** -0.5``
rescaling T5 applies before its tied head.  So ``lm_head(decode(...))`` are the logits, and objectives can run
:func:`lmforge.models.heads.chunked_cross_entropy` on ``decode``'s output as they do for decoder LMs.

T5's attention differs from GPT's in three ways, all in :mod:`lmforge.models.t5_layers`: no ``1/sqrt(d)``
score scaling (folded into the init of ``q``), a learned bias per head added to the scores from the bucketed
distance ``key - query`` (computed once per stack from ``relative_attention_bias`` and shared by all layers;
bidirectional buckets in the encoder, causal ones in the decoder), and RMS norms without mean subtraction or bias.

Module tree (lmforge paths; leaf names are Hugging Face's; :mod:`lmforge.models.hf_t5` maps them)::

    shared                                   token embeddings, used by encoder, decoder (and head if tied)
    encoder.relative_attention_bias          Embedding [num_buckets, num_heads]
    encoder.blocks.{i}.self_attn.{layer_norm, q, k, v, o}
    encoder.blocks.{i}.ff.{layer_norm, wi | wi_0, wi_1, wo}
    encoder.final_layer_norm
    decoder.relative_attention_bias
    decoder.blocks.{i}.self_attn.{layer_norm, q, k, v, o}
    decoder.blocks.{i}.cross_attn.{layer_norm, q, k, v, o}
    decoder.blocks.{i}.ff.{...}
    decoder.final_layer_norm
    lm_head                                  Linear; weight is shared.weight when tied
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.cache import KVCache
from lmforge.models.layers import Embedding, Linear
from lmforge.models.slots import INPUT, PAST_KV, PrefixCache, SlotHost, prefilled, prepend, with_leading_ones
from lmforge.models.t5_layers import EncDecCache, T5Config, T5Stack, padding_bias


class EncoderDecoderLM(SlotHost):
    """T5: ``forward(input_ids, attention_mask, decoder_input_ids) -> dec_hidden [B, T, d]`` (head input).

    Built on the meta device, materialised on ``device`` and reset, like :class:`lmforge.models.decoder.DecoderLM`,
    so ``with torch.device("meta"): m = EncoderDecoderLM(c)`` + ``m.to_empty(...)`` + ``m.reset_parameters()``
    equals an eager build bitwise for the same seed.  Delta methods' slots (:mod:`lmforge.models.slots`): ``input``
    (the encoder's) and ``past_kv`` (the decoder's self-attention).
    """

    is_encoder_decoder = True
    slot_kinds = (INPUT, PAST_KV)

    def __init__(self, config: T5Config, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = c = config
        target = torch.device(device) if device is not None else torch.get_default_device()
        with torch.device("meta"):
            self.shared = Embedding(c.vocab_size, c.d_model, std=c.initializer_factor * 1.0)
            self.encoder = T5Stack(c, is_decoder=False)
            self.decoder = T5Stack(c, is_decoder=True)
            self.lm_head = Linear(c.d_model, c.vocab_size, bias=False, std=c.initializer_factor * 1.0)
        self.tie_weights()
        if target.type != "meta":
            self.to_empty(device=target)
            self.reset_parameters()

    # ---- parameters ------------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Share ``shared.weight`` with ``lm_head.weight`` when tied (again after ``to_empty``)."""
        if self.config.tied:
            self.lm_head.weight = self.shared.weight

    def reset_parameters(self) -> None:
        """HF's T5 init in registration order: embeddings N(0, f), q N(0, f/sqrt(d*d_kv)), k/v N(0, f/sqrt(d)),
        o N(0, f/sqrt(H*d_kv)), wi* N(0, f/sqrt(d)), wo N(0, f/sqrt(d_ff)), position biases N(0, f/sqrt(d)),
        norms f, untied head N(0, f)."""
        self.tie_weights()
        for name, child in self.named_children():
            if name == "lm_head" and self.config.tied:
                continue
            child.reset_parameters()

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (training with grad, no cache only)."""
        self.encoder.activation_checkpointing = self.decoder.activation_checkpointing = bool(enabled)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    # ---- pieces ----------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids [B, S]`` (+ ``attention_mask [B, S]``, 1 = real, padding on either side) -> ``[B, S, d]``
        (``[B, n + S, d]`` with the ``input`` slot filled; masks passed to :meth:`decode` stay the real tokens')."""
        x = self.shared(input_ids)
        front = self.slot(INPUT)
        if front is not None:
            x, attention_mask = prepend(front, x), with_leading_ones(attention_mask, front.n)
        return self.encoder(x, padding_bias(attention_mask))

    def decode(self, decoder_input_ids: torch.Tensor, enc_hidden: torch.Tensor | None,
               enc_mask: torch.Tensor | None = None, cache: EncDecCache | None = None) -> torch.Tensor:
        """``decoder_input_ids [B, T]`` -> ``[B, T, d]``: final norm applied and, for v1.0 (``scales_output``),
        multiplied by ``d_model ** -0.5`` -- the LM head's input.

        Decoder rows are causal, so right padding of targets needs no mask.  With ``cache`` the new tokens
        follow ``cache.length`` stored ones; ``enc_hidden`` may be None once the cross keys/values are cached.
        """
        T = decoder_input_ids.shape[1]
        past_kv = self.slot(PAST_KV)
        if past_kv is not None and cache is None:  # a self-attention cache already n long
            B = decoder_input_ids.shape[0]
            cache = EncDecCache(PrefixCache(past_kv(B, self.dtype)), self.config.decoder_layers)
        past = cache.length if cache is not None else 0
        causal = None
        if T > 1:  # one new token sees every stored key; several need a (possibly offset) causal mask
            q_pos = torch.arange(past, past + T, device=decoder_input_ids.device)[:, None]
            k_pos = torch.arange(past + T, device=decoder_input_ids.device)[None, :]
            causal = ((k_pos > q_pos).float() * torch.finfo(torch.float32).min)[None, None]
        front = self.slot(INPUT)
        if front is not None:  # the encoder output starts with the input slot's n positions
            enc_mask = with_leading_ones(enc_mask, front.n)
        h = self.decoder(self.shared(decoder_input_ids), causal, enc_hidden, padding_bias(enc_mask), cache)
        if cache is not None:
            cache.self_attn.advance(T)
        if self.config.scales_output:
            h = h * self.config.d_model ** -0.5
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if decoder_input_ids is None:
            raise ValueError("EncoderDecoderLM.forward needs decoder_input_ids (e.g. model.shift_right(labels))")
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    # ---- helpers ---------------------------------------------------------------------------------
    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs: ``[start, labels[:-1]]`` with ``-100`` replaced by the pad id."""
        out = labels.new_full(labels.shape, self.config.start_token_id)
        out[..., 1:] = labels[..., :-1]
        return out.masked_fill_(out == -100, self.config.pad_token_id)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> EncDecCache:
        """A decoding cache for ``max_len`` decoder positions."""
        c = self.config
        past_kv = self.slot(PAST_KV)
        n = past_kv.n if past_kv is not None else 0
        kv = KVCache(c.decoder_layers, batch_size, c.num_heads, c.d_kv, max_len + n,
                     dtype=dtype or self.dtype, device=device or self.device)
        return EncDecCache(prefilled(kv, past_kv, batch_size) if n else kv, c.decoder_layers)
