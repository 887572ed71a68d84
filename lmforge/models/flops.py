"""Parameter and FLOP counts for scaling studies and throughput (MFU) reporting.

Training FLOPs per token follow Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (§2.1,
Table 1: forward ≈ 2N + 2·n_layer·n_ctx·d_attn, training ≈ 3× forward) with the attention term as in
Chowdhery et al. 2022, "PaLM" (Appendix B, model FLOPs per token = 6N + 12·L·H·Q·T, here H·Q = d_model),
which counts the full ``T x T`` score and value products (no discount for causal masking)::

    flops_per_token = 6 * N + 12 * n_layer * d_model * seq_len

where ``N`` is the non-embedding parameter count *including* the LM head matrix (the head's matmul is
real compute per token; token and position embedding lookups are not).

Encoders and encoder–decoders have formulas of their own (:func:`bert_flops_per_token`: the MLM head only at the
masked positions; :func:`t5_flops_per_token`: each stack at its own length plus cross-attention).  Each family
registers its :class:`FlopFormula` (``Family.flops``); callers reach it through the registry
(``lmforge.models.families.base.train_flops_per_token``), never by the family's name.  Every formula is checked
against ``torch.utils.flop_counter.FlopCounterMode`` on a forward + backward (tests/unit/test_flops.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lmforge.models.decoder_config import DecoderConfig


def count_params(model: nn.Module, non_embedding: bool = True, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once).

    ``non_embedding=True`` leaves out the weights of ``nn.Embedding`` modules (token, position) unless
    the same tensor is also used by another module — a tied LM head counts, once, as the head.
    """
    in_embedding: set[int] = set()
    elsewhere: set[int] = set()
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        target = in_embedding if isinstance(module, nn.Embedding) else elsewhere
        for p in module.parameters(recurse=False):
            params[id(p)] = p
            target.add(id(p))
    total = 0
    for pid, p in params.items():
        if trainable_only and not p.requires_grad:
            continue
        if non_embedding and pid in in_embedding and pid not in elsewhere:
            continue
        total += p.numel()
    return total


def config_params(config: DecoderConfig, non_embedding: bool = True) -> int:
    """Parameter count of ``DecoderLM(config)`` (or a variant family's model) from its shape alone (no model
    built): the layout is the config's ``architecture``, the MLP's size its ``mlp_matrices``."""
    c = config
    d, f, L, V = c.d_model, c.ffn_dim, c.n_layer, c.vocab_size
    if c.architecture == "gpt2":
        attn = d * 3 * d + 3 * d + d * d + d
        mlp = d * f + f + f * d + d
        norms = 2 * 2 * d
        final_norm = 2 * d
        embeddings = V * d + c.max_seq_len * d
    else:
        kv = c.kv_heads * c.head_dim
        attn = d * d + 2 * d * kv + d * d
        if c.has_attention_bias or c.qkv_bias:
            attn += d + 2 * kv
        if c.has_attention_bias:
            attn += d
        m = c.mlp_matrices  # each has a bias of its output width when biased: f each, d for the last
        mlp = m * d * f + (((m - 1) * f + d) if c.has_mlp_bias else 0)
        norms = 2 * d
        final_norm = d
        embeddings = V * d
    head = V * d
    body = L * (attn + mlp + norms) + final_norm + head
    if non_embedding:
        return body
    return body + embeddings - (head if c.tie_embeddings else 0)


def flops_per_token(config: DecoderConfig, seq_len: int | None = None) -> int:
    """Training (forward + backward) FLOPs per token: ``6*N + 12*L*d*T`` (see module docstring);
    ``seq_len`` defaults to ``config.max_seq_len``."""
    T = config.max_seq_len if seq_len is None else seq_len
    return 6 * config_params(config, non_embedding=True) + 12 * config.n_layer * config.d_model * T


@dataclass(frozen=True)
class FlopFormula:
    """A family's parameter and training-FLOP counts, registered with it (``Family.flops``).

    ``params(config, non_embedding) -> int``; ``per_token(config, seq_len, **shape) -> float``: training (forward +
    backward = 3 × forward) FLOPs per token of a ``seq_len`` input window, ``shape`` the objective's extra sizes
    (``mask_rate`` for an MLM, ``target_len`` for an encoder–decoder); ``convention``: one line saying what is
    counted, printed with every figure that uses it."""

    params: Callable[..., int]
    per_token: Callable[..., float]
    convention: str


DECODER_CONVENTION = ("training FLOPs/token = 6·N + 12·n_layer·d_attn·seq_len (Kaplan 2020 / PaLM App. B): N "
                      "without embeddings, LM head included; full T×T attention, no causal discount; norms, "
                      "activations and softmax not counted")
DECODER_FLOPS = FlopFormula(config_params, lambda c, seq_len, **_: flops_per_token(c, seq_len), DECODER_CONVENTION)


def meta_params(model_class: type) -> Callable[..., int]:
    """``(config, non_embedding) -> int`` by building ``model_class(config)`` on the meta device (no memory, no
    init) and counting with :func:`count_params`: exact for any layout, so no second copy of it to keep in step."""

    def params(config: Any, non_embedding: bool = True) -> int:
        with torch.device("meta"):
            return count_params(model_class(config), non_embedding=non_embedding)

    return params


def bert_flops_per_token(c: Any, seq_len: int, mask_rate: float = 0.15, **_: Any) -> float:
    """BERT (MLM + NSP) training FLOPs per input token: ``3 ×`` the forward matmuls (``2·m·n·k`` each) of

    - each layer: q, k, v, o (``4·d²``) and the MLP (``2·d·d_ff``) at every position, plus the ``T × T`` scores
      and their product with the values (``2·T·d``): per token ``6·L·(4d² + 2·d·d_ff) + 12·L·d·T``;
    - the MLM head (transform ``d²`` + vocabulary ``d·V``) only at the masked positions, as lmforge's MLM
      objective runs it (a ``mask_rate`` share of the tokens): ``6·(d² + d·V)·mask_rate``;
    - the pooler and NSP head (``d² + 2d``) once per sequence: ``6·(d² + 2d) / T``."""
    d, f, L, V, T = c.d_model, c.ffn_dim, c.n_layer, c.vocab_size, seq_len
    body = 6 * L * (4 * d * d + 2 * d * f) + 12 * L * d * T
    return body + 6 * (d * d + d * V) * mask_rate + 6 * (d * d + 2 * d) / T


BERT_CONVENTION = ("training FLOPs/input token = 6·L·(4d² + 2d·d_ff) + 12·L·d·T (every position) + 6·(d² + d·V)·"
                   "mask_rate (MLM head at masked positions only) + 6·(d² + 2d)/T (pooler + NSP once per sequence); "
                   "matmuls only, 3 × forward")


def t5_flops_per_token(c: Any, seq_len: int, target_len: int | None = None, **_: Any) -> float:
    """T5 training FLOPs per encoder (input) token, with ``target_len`` decoder tokens per ``seq_len`` input tokens
    (span corruption: ``span.targets_length``; default ``seq_len``).  Per example, ``3 ×`` the forward matmuls of

    - the encoder at ``Te`` positions: ``2·Te·Le·(4·d·i + F)`` (``i = heads·d_kv``, ``F = 2·d·d_ff``, gated
      ``3·d·d_ff``) and self-attention ``4·Le·i·Te²``;
    - the decoder at ``Td`` positions: self-attention projections, cross-attention q and o, the MLP —
      ``2·Td·Ld·(6·d·i + F)`` — its self-attention ``4·Ld·i·Td²``, the cross-attention scores and values
      ``4·Ld·i·Td·Te``, and the LM head ``2·Td·d·V``;
    - the cross-attention k and v of every encoder output, per decoder layer: ``2·Te·Ld·2·d·i``.
    Relative-position biases are lookups (no FLOPs)."""
    Te, Td = seq_len, (seq_len if target_len is None else target_len)
    d, i, V, Le, Ld = c.d_model, c.inner_dim, c.vocab_size, c.num_layers, c.decoder_layers
    F = (3 if c.gated else 2) * d * c.d_ff
    fwd = (2 * Te * Le * (4 * d * i + F) + 4 * Le * i * Te * Te
           + 2 * Td * Ld * (6 * d * i + F) + 4 * Ld * i * Td * Td + 4 * Ld * i * Td * Te + 2 * Td * d * V
           + 2 * Te * Ld * 2 * d * i)
    return 3 * fwd / Te


T5_CONVENTION = ("training FLOPs/encoder token = 3 × forward matmuls per example (encoder stack, decoder stack with "
                 "cross-attention q/o per decoder token and k/v per encoder token, T×T attention in each, LM head "
                 "per decoder token) / encoder tokens")


# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s, from the vendors' data sheets, matched by
# substring of ``torch.cuda.get_device_name`` (first match wins: the more specific names come first).
_PEAK_BF16 = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 125e12), ("A10", 125e12),
)


def device_peak_flops(device, dtype=None) -> float | None:
    """The device's dense peak in FLOP/s for ``dtype`` compute, or None when unknown.

    ``LMFORGE_PEAK_TFLOPS`` overrides the table (any device).  Known: bf16/fp16 on the NVIDIA data-centre
    GPUs above; fp32 and CPUs have no entry (MFU is then not reported rather than guessed).
    """
    override = os.environ.get("LMFORGE_PEAK_TFLOPS")
    if override:
        try:
            return float(override) * 1e12
        except ValueError:
            return None
    if getattr(device, "type", str(device)) != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_BF16:
        if key in name:
            return peak
    return None
