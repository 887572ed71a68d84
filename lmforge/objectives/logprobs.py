"""Per-token and per-sequence log-probabilities of a causal LM: the quantity DPO, PPO and GRPO compare.

``token_logprobs(model, input_ids, ...)`` returns, for every position ``t >= 1`` that is scored,
``log p(x_t | x_<t)`` under ``softmax(logits / T)`` (the temperature divides the logits, as TRL does), plus
per-row sums and counts and, optionally, the per-token entropy of that distribution.  The LM head runs
through :class:`_HeadLogProbs`, chunk by chunk, so the full ``[B, T, V]`` fp32 logits never exist; the
log-softmax is accumulated in fp32 whatever the model's dtype.

Alignment: outputs are ``[B, T]`` aligned with ``input_ids`` (column ``t`` scores token ``t``); column 0 and
every position outside ``score_mask`` (or outside ``attention_mask``) hold 0.  Right and left padding both
work: with an ``attention_mask`` the model takes positions from it, so a left-padded row scores as unpadded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.heads import _TARGET_ELEMENTS  # the same logits budget per chunk as the training loss


class _HeadLogProbs(torch.autograd.Function):
    """``log_softmax(lm_head(h) / T)[target]`` for rows ``h [n, d]`` in chunks; backward recomputes each chunk's
    logits (one extra head matmul) instead of keeping ``[n, V]`` of softmax for the gradient.

    d logp_i / d z_i = (onehot(y_i) - softmax(z_i)) / T where z = h W^T + b, so with upstream g_i:
    dz = g[:, None] * (onehot - p) / T; dh = dz W; dW = dz^T h; db = dz.sum(0).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_t, chunk_size, want_entropy):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(n, dtype=torch.float32, device=hidden.device) if want_entropy else None
        for s in range(0, n, chunk_size):
            z = F.linear(hidden[s:s + chunk_size], weight, bias).float() * inv_t  # [c, V] fp32
            lsm = torch.log_softmax(z, dim=-1)
            logp[s:s + chunk_size] = lsm.gather(1, targets[s:s + chunk_size, None]).squeeze(1)
            if ent is not None:
                ent[s:s + chunk_size] = -(lsm.exp() * lsm).sum(-1)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets)
        ctx.has_bias, ctx.inv_t, ctx.chunk_size = bias is not None, inv_t, chunk_size
        if ent is not None:
            ctx.mark_non_differentiable(ent)
            return logp, ent
        return logp, torch.empty(0, device=hidden.device)

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        hidden, weight, bias, targets = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        d_h = torch.empty_like(hidden) if need_h else None
        d_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        d_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        c = ctx.chunk_size
        for s in range(0, hidden.shape[0], c):
            h = hidden[s:s + c]
            z = F.linear(h, weight, bias).float() * ctx.inv_t
            dz = torch.softmax(z, dim=-1).neg_()
            dz.scatter_add_(1, targets[s:s + c, None], torch.ones_like(dz[:, :1]))
            dz.mul_((grad_logp[s:s + c].float() * ctx.inv_t)[:, None])
            if d_h is not None:
                d_h[s:s + c] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if d_w is not None:
                d_w += dz.t() @ h.float()
            if d_b is not None:
                d_b += dz.sum(0)
        return (d_h, d_w.to(weight.dtype) if d_w is not None else None,
                d_b.to(bias.dtype) if d_b is not None else None, None, None, None, None)


def head_logprobs(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
                  entropy: bool = False, chunk_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``hidden [n, d]`` and their ``targets [n]`` -> ``(logp [n] fp32, entropy [n] fp32 or None)`` of
    ``softmax(lm_head(hidden) / temperature)``.  The log-probs carry a gradient; the entropy does not."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weight, bias = lm_head.weight, lm_head.bias
    if chunk_size is None:
        chunk_size = max(1, _TARGET_ELEMENTS // weight.shape[0])
    logp, ent = _HeadLogProbs.apply(hidden, weight, bias, targets, 1.0 / float(temperature), int(chunk_size),
                                    bool(entropy))
    return logp, (ent if entropy else None)


@dataclass
class TokenLogProbs:
    """``logprobs``/``entropy`` ``[B, T]`` aligned with ``input_ids`` (0 where not scored), ``mask`` ``[B, T]``
    bool (the scored tokens), ``sums`` ``[B]`` fp32 and ``counts`` ``[B]`` int64 per row."""

    logprobs: torch.Tensor
    mask: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor
    entropy: torch.Tensor | None = None

    @property
    def means(self) -> torch.Tensor:
        """Per-row mean log-prob (0 for a row with nothing scored)."""
        return self.sums / self.counts.clamp(min=1)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   score_mask: torch.Tensor | None = None, *, temperature: float = 1.0, entropy: bool = False,
                   chunk_size: int | None = None) -> TokenLogProbs:
    """Score ``input_ids [B, T]`` with a causal LM whose ``forward`` returns hidden states and has ``lm_head``.

    ``score_mask [B, T]`` (1 = score this token; e.g. the completion of a prompt) defaults to
    ``attention_mask`` (or every token); column 0 is never scored (nothing predicts it).  Only the scored rows
    go through the head.  Gradients flow into the model unless the caller runs under ``no_grad``.
    """
    hidden = model(input_ids, attention_mask=attention_mask)  # [B, T, d]
    return hidden_logprobs(hidden, model.lm_head, input_ids, attention_mask, score_mask, temperature=temperature,
                           entropy=entropy, chunk_size=chunk_size)


def hidden_logprobs(hidden: torch.Tensor, lm_head: nn.Linear, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, score_mask: torch.Tensor | None = None, *,
                    temperature: float = 1.0, entropy: bool = False, chunk_size: int | None = None) -> TokenLogProbs:
    """:func:`token_logprobs` from hidden states ``[B, T, d]`` a caller already has (PPO's value head reads the
    same forward's hidden states)."""
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if score_mask is None else score_mask.bool().clone()
    if attention_mask is not None:
        mask &= attention_mask.bool()
    mask[:, 0] = False
    pred = torch.zeros_like(mask)
    pred[:, :-1] = mask[:, 1:]  # hidden at t-1 predicts token t
    logp_rows, ent_rows = head_logprobs(hidden[pred], lm_head, input_ids[mask], temperature, entropy, chunk_size)
    logprobs = torch.zeros((B, T), dtype=torch.float32, device=input_ids.device)
    logprobs = logprobs.masked_scatter(mask, logp_rows)
    ent = None
    if ent_rows is not None:
        ent = torch.zeros((B, T), dtype=torch.float32, device=input_ids.device).masked_scatter(mask, ent_rows)
    return TokenLogProbs(logprobs=logprobs, mask=mask, sums=logprobs.sum(-1), counts=mask.sum(-1), entropy=ent)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      score_mask: torch.Tensor | None = None, *, temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(sum of log-probs [B] fp32, number of scored tokens [B] int64)``: DPO's sequence score."""
    out = token_logprobs(model, input_ids, attention_mask, score_mask, temperature=temperature)
    return out.sums, out.counts
