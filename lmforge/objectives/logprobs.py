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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.heads import _TARGET_ELEMENTS  # the same logits budget per chunk as the training loss
from lmforge.models.slots import INPUT, PAST_KV, SIDE, PrefixCache


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


def skip_padding(model: nn.Module, mask: torch.Tensor | None) -> dict[str, Any]:
    """``forward`` kwargs that let a model skip padding (``real_tokens``, :class:`lmforge.models.decoder.DecoderLM`)
    when ``mask`` has any and the model says it can (``skips_padding``); else none, and the full pass runs."""
    if mask is None or not getattr(model, "skips_padding", False) or bool(mask.all()):
        return {}
    return {"real_tokens": mask}


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   score_mask: torch.Tensor | None = None, *, temperature: float = 1.0, entropy: bool = False,
                   chunk_size: int | None = None) -> TokenLogProbs:
    """Score ``input_ids [B, T]`` with a causal LM whose ``forward`` returns hidden states and has ``lm_head``.

    ``score_mask [B, T]`` (1 = score this token; e.g. the completion of a prompt) defaults to
    ``attention_mask`` (or every token); column 0 is never scored (nothing predicts it).  Only the scored rows
    go through the head.  Gradients flow into the model unless the caller runs under ``no_grad``.
    """
    hidden = model(input_ids, attention_mask=attention_mask, **skip_padding(model, attention_mask))  # [B, T, d]
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


class _PromptKV:
    """A cache stand-in for the prompts' forward: keeps each layer's keys/values (with their graph), stores nothing
    else, so the answers' forward can attend to them (:class:`lmforge.models.slots.PrefixCache`)."""

    def __init__(self, n_layers: int) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.length = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv[layer_idx] = (k, v)
        return k, v

    def advance(self, n: int) -> None:
        pass


def shares_prompts(model: nn.Module) -> bool:
    """Can :func:`shared_prompt_logprobs` run ``model``: a decoder with the cache protocol and no slot filled (a soft
    prompt, prefix or side network changes what a cached prompt means)."""
    slot = getattr(model, "slot", None)
    return (slot is not None and hasattr(model, "blocks") and hasattr(model, "lm_head")
            and all(slot(k) is None for k in (INPUT, PAST_KV, SIDE)))


def shared_prompt_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           score_mask: torch.Tensor, prompt_len: torch.Tensor, group: torch.Tensor, *,
                           temperature: float = 1.0, entropy: bool = False,
                           chunk_size: int | None = None) -> TokenLogProbs:
    """:func:`token_logprobs` of right-padded ``prompt + answer`` rows where consecutive rows of one ``group`` share
    their prompt (GRPO's G answers): each prompt runs once, its keys/values are repeated for its answers, which run
    after it -- the same numbers (causal attention: a prompt's states do not depend on what follows), the prompt's
    work done once instead of G times, gradients through both passes.  ``prompt_len [B]``: each row's prompt tokens;
    ``group [B]``: equal on the rows of one prompt (contiguous)."""
    B, L = input_ids.shape
    dev = input_ids.device
    plen = prompt_len.to(dev).long()
    clen = attention_mask.sum(-1).long() - plen
    _, inverse = torch.unique_consecutive(group.to(dev), return_inverse=True)
    first = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=dev).scatter_reduce(
        0, inverse, torch.arange(B, device=dev), reduce="amin", include_self=False)
    Lp, Lc = int(plen.max()), max(int(clen.max()), 1)
    # prompts left-padded [P, Lp] (positions from the mask, as generation runs them)
    p_idx = plen[first, None] - Lp + torch.arange(Lp, device=dev)
    p_mask = p_idx >= 0
    p_ids = input_ids[first].gather(1, p_idx.clamp(min=0)) * p_mask
    rec = _PromptKV(len(model.blocks))
    h_prompt = model(p_ids, attention_mask=p_mask, cache=rec)  # [P, Lp, d]
    kv = [(k.index_select(0, inverse), v.index_select(0, inverse)) for k, v in rec.kv]
    # answers [B, Lc] after their prompt's cached keys/values
    c_idx = plen[:, None] + torch.arange(Lc, device=dev)
    c_mask = torch.arange(Lc, device=dev)[None] < clen[:, None]
    c_ids = input_ids.gather(1, c_idx.clamp(max=L - 1)) * c_mask
    mask2 = torch.cat([p_mask.index_select(0, inverse), c_mask], dim=1)
    h_answer = model(c_ids, attention_mask=mask2, position_ids=c_idx, cache=PrefixCache(kv))  # [B, Lc, d]
    # the state predicting answer token t: the prompt's last (t = 0), else the answer's token t - 1
    pred = torch.cat([h_prompt[:, -1:].index_select(0, inverse), h_answer[:, :-1]], dim=1)
    scored = c_mask & score_mask.gather(1, c_idx.clamp(max=L - 1)).bool()
    logp_rows, ent_rows = head_logprobs(pred[scored], model.lm_head, c_ids[scored], temperature, entropy, chunk_size)
    rows = torch.arange(B, device=dev)[:, None].expand(B, Lc)[scored]
    cols = c_idx[scored]
    mask = torch.zeros(B, L, dtype=torch.bool, device=dev).index_put((rows, cols), torch.ones_like(cols).bool())
    logprobs = torch.zeros(B, L, dtype=torch.float32, device=dev).index_put((rows, cols), logp_rows)
    ent = None
    if ent_rows is not None:
        ent = torch.zeros(B, L, dtype=torch.float32, device=dev).index_put((rows, cols), ent_rows)
    return TokenLogProbs(logprobs=logprobs, mask=mask, sums=logprobs.sum(-1), counts=mask.sum(-1), entropy=ent)
