"""Language-model head losses.

``chunked_cross_entropy`` applies the LM head and cross-entropy over chunks of rows, so the full
``[B, T, V]`` fp32 logits never exist: per chunk it computes the logits, the summed loss and (when a
gradient is needed) the gradient with respect to the chunk's hidden states and the head weight, then
drops the logits.  Backward only scales the stored gradients, so the cost is the same three matmuls as
the plain computation, with ``chunk_size x V`` logits alive at a time instead of ``B*T x V``.

Labels are aligned with ``hidden`` (row ``i`` predicts ``labels[i]``): shifting for next-token
prediction is the objective's job.  Both functions return the *summed* loss and the number of targets
(a 0-dim int64 tensor); the Trainer divides by the count over the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_TARGET_ELEMENTS = 1 << 25  # default chunk: about 32M logits (128 MiB in fp32) at a time


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain summed cross-entropy of ``logits [..., V]`` (computed in fp32) against ``labels [...]``."""
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1), ignore_index=ignore_index,
                           reduction="sum")
    return loss, (labels != ignore_index).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, grad_hidden, grad_weight, grad_bias):
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        g_h = torch.empty_like(hidden) if grad_hidden else None
        g_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
        g_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if grad_bias else None
        need_grad = grad_hidden or grad_weight or grad_bias
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            y = labels[start:start + chunk_size]
            logits = F.linear(h, weight, bias).float()  # [c, V]
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not need_grad:
                continue
            # d loss / d logits = softmax - onehot, computed in place in the logits buffer.
            probs = logits.sub_(lse[:, None]).exp_()
            probs.scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -1.0))
            p = probs.to(weight.dtype)
            if g_h is not None:
                g_h[start:start + chunk_size] = p @ weight
            if g_w is not None:
                if p.dtype == torch.float32 and h.dtype == torch.float32:
                    g_w.addmm_(p.t(), h)
                else:
                    g_w += (p.t() @ h.to(p.dtype)).float()
            if g_b is not None:
                g_b += probs.sum(0)
        ctx.save_for_backward(g_h, g_w, g_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        g_h, g_w, g_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        d_h = g_h * grad_loss.to(g_h.dtype) if g_h is not None else None
        d_w = (g_w * grad_loss).to(w_dtype) if g_w is not None else None
        d_b = (g_b * grad_loss).to(b_dtype) if g_b is not None else None
        return d_h, d_w, d_b, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor,
                          ignore_index: int = -100, chunk_size: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``lm_head(hidden)`` against ``labels`` without materialising all logits.

    ``hidden [..., d]`` and ``labels [...]`` are aligned (no shift inside).  Rows whose label is
    ``ignore_index`` are dropped before the head is applied.  ``chunk_size`` rows are processed at a
    time (default: about 32M logits per chunk).  Returns ``(loss_sum fp32, n_targets int64)``;
    gradients equal those of ``cross_entropy_sum(lm_head(hidden), labels)``.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    y = labels.reshape(-1)
    valid = y != ignore_index
    n_targets = valid.sum()
    if not bool(valid.all()):
        h = h[valid]
        y = y[valid]
    weight, bias = lm_head.weight, lm_head.bias
    if chunk_size is None:
        chunk_size = max(1, _TARGET_ELEMENTS // weight.shape[0])
    if h.shape[0] == 0:
        return (h.sum() * 0.0 + weight.sum() * 0.0).float(), n_targets
    grad_on = torch.is_grad_enabled()
    loss = _LinearCrossEntropy.apply(
        h, weight, bias, y, int(chunk_size),
        grad_on and h.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad)
    return loss, n_targets
