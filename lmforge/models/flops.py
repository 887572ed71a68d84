"""Parameter and FLOP counts for scaling studies and throughput (MFU) reporting.

Training FLOPs per token follow Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (§2.1,
Table 1: forward ≈ 2N + 2·n_layer·n_ctx·d_attn, training ≈ 3× forward) with the attention term as in
Chowdhery et al. 2022, "PaLM" (Appendix B, model FLOPs per token = 6N + 12·L·H·Q·T, here H·Q = d_model),
which counts the full ``T x T`` score and value products (no discount for causal masking)::

    flops_per_token = 6 * N + 12 * n_layer * d_model * seq_len

where ``N`` is the non-embedding parameter count *including* the LM head matrix (the head's matmul is
real compute per token; token and position embedding lookups are not).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

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
