"""Multiple choice by log-likelihood, scored as lm-evaluation-harness scores it, with each context run once.

The rules (lm-eval 0.4.13, ``api/model.py::_encode_pair``, ``loglikelihood``, ``models/huggingface.py::
_loglikelihood_tokens`` and ``api/task.py::process_results``):

* a request is ``(context, continuation)``; trailing whitespace of the context moves to the front of the
  continuation; ``context + continuation`` is encoded whole, the context alone, and the continuation's tokens are
  the whole string's after the context's length (so a BPE merge across the boundary is scored as lm-eval does);
* an empty context is the tokenizer's EOS (lm-eval's ``prefix_token_id``), unless the continuation starts with it;
* the log-likelihood is the sum of ``log p(token)`` over the continuation's tokens; ``is_greedy``: every one of
  them is the argmax of its distribution;
* inputs longer than the model's window are cut on the left to ``max_len + 1`` tokens, the last dropped;
* for a question with choices ``c_i`` (continuation ``target_delimiter + c_i``): ``acc`` = argmax of the
  log-likelihoods is the answer; ``acc_norm`` = argmax of ``ll_i / len(c_i)`` (characters, without the
  delimiter); ``acc_bytes`` = argmax of ``ll_i / len(c_i.encode())``.  numpy's argmax: the first of equal values.

Shared contexts: the choices of one question share its context tokens, so instead of one forward per (context,
choice) a context and all its continuations go into one row -- ``[ctx | cont_1 | cont_2 | ...]`` -- with a 4-D
attention mask (each continuation sees the context and itself, causally, never another continuation) and position
ids that restart after the context for each continuation.  The logits of continuation ``i`` are then exactly those
of the row ``ctx + cont_i`` alone.  The decoder's packed-row path (:mod:`lmforge.models.decoder`, what SFT packing
uses) takes such rows; the scored positions go through the per-token log-prob helper
(:func:`lmforge.objectives.logprobs.head_logprobs`).  :func:`score_requests_per_choice` is the plain one-row-per-
request path (the benchmark's baseline, and what a row too long to pack falls back to).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import DataError, ModelError
from lmforge.core.tokenizer import Tokenizer
from lmforge.models.families import family_of
from lmforge.objectives.logprobs import head_logprobs


@dataclass(frozen=True)
class ChoiceItem:
    """One question: its prompt (``context``, few-shot examples included), the choices and the right one."""

    context: str
    choices: tuple[str, ...]
    answer: int
    where: str = ""
    """Where the item came from (``file:line``, ``world-fact #3``), for error messages."""


@dataclass
class ChoiceScore:
    """What :func:`score_choices` measures for one item: per-choice log-likelihoods and whether each choice is the
    greedy continuation, the three predictions and their correctness (1.0 / 0.0, as lm-eval reports them)."""

    loglikelihoods: list[float]
    is_greedy: list[bool]
    answer: int
    pred: int
    pred_norm: int
    pred_bytes: int
    acc: float = field(init=False)
    acc_norm: float = field(init=False)
    acc_bytes: float = field(init=False)

    def __post_init__(self) -> None:
        self.acc = float(self.pred == self.answer)
        self.acc_norm = float(self.pred_norm == self.answer)
        self.acc_bytes = float(self.pred_bytes == self.answer)


def check_item(item: ChoiceItem) -> None:
    """A question needs two choices at least and an answer index among them (one line naming the item)."""
    n = len(item.choices)
    if n < 2:
        raise DataError(f"{item.where or 'item'}: {n} choice{'' if n == 1 else 's'} {list(item.choices)}; a "
                        f"multiple-choice question needs at least 2 choices")
    if isinstance(item.answer, bool) or not isinstance(item.answer, int) or not 0 <= item.answer < n:
        raise DataError(f"{item.where or 'item'}: answer {item.answer!r} is not an index of its {n} choices "
                        f"(0..{n - 1}); give the right choice's 0-based index")


def check_decoder(model: nn.Module, path: str, command: str = "eval choice") -> None:
    """Scoring runs a causal LM over prompt + answer; an encoder or encoder-decoder dir is one line."""
    family = family_of(model)
    if family is None or family.kind != "decoder":
        name = family.name if family is not None else type(model).__name__
        kind = family.kind if family is not None else "model"
        raise ModelError(f"'{path}' is a {name} {kind}; `lmforge {command}` scores causal decoders (gpt2, llama "
                         f"and kin) by the log-likelihood of each answer after the prompt: pass a decoder's model dir")


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``(context_enc, continuation_enc)`` for a causal LM (see the module's docstring)."""
    if context == "":
        cont = tokenizer.encode(continuation)
        prefix = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
        if prefix is None:
            raise DataError("an empty context is scored after the tokenizer's EOS token, and this tokenizer has "
                            "none; give every item a context")
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def _window(model: nn.Module, max_length: int | None = None) -> int:
    """lm-eval's ``max_length``: the model's positions, or fewer (e.g. the window it was trained on)."""
    return int(model.config.max_seq_len) if max_length is None else min(int(max_length), model.config.max_seq_len)


def _truncated(ctx: list[int], cont: list[int], max_len: int) -> list[int]:
    """lm-eval's model input: ``(ctx + cont)[-(max_len + 1):][:-1]``."""
    return (ctx + cont)[-(max_len + 1):][:-1]


def _score_rows(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and greedy flags of ``targets`` predicted by ``hidden[rows, cols]``."""
    h = hidden[rows, cols]
    logp, _ = head_logprobs(h, model.lm_head, targets)
    greedy = F.linear(h, model.lm_head.weight, model.lm_head.bias).argmax(-1) == targets
    return logp, greedy


@torch.no_grad()
def score_requests_per_choice(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]],
                              batch_size: int = 16, max_length: int | None = None) -> list[tuple[float, bool]]:
    """One right-padded row per ``(context ids, continuation ids)``, as lm-eval's HFLM runs them: the input is
    ``(ctx + cont)[-(max_len + 1):][:-1]`` and its last ``len(cont)`` positions predict the continuation."""
    max_len, out = _window(model, max_length), []
    device = model.lm_head.weight.device
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        inps = [_truncated(c, k, max_len) for c, k in chunk]
        T = max(map(len, inps))
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        attn = torch.zeros(len(chunk), T, dtype=torch.long)
        b_idx, t_idx, tgt, owner = [], [], [], []
        for i, (inp, (_, k)) in enumerate(zip(inps, chunk)):
            ids[i, :len(inp)] = torch.tensor(inp)
            attn[i, :len(inp)] = 1
            b_idx += [i] * len(k)
            t_idx += list(range(len(inp) - len(k), len(inp)))
            tgt += k
            owner += [i] * len(k)
        hidden = model(ids.to(device), attention_mask=attn.to(device))
        out += _gather(model, hidden, b_idx, t_idx, tgt, owner, len(chunk))
    return out


def _gather(model: nn.Module, hidden: torch.Tensor, b_idx: list[int], t_idx: list[int], tgt: list[int],
            owner: list[int], n: int) -> list[tuple[float, bool]]:
    """Per-request ``(sum of log-probs, all greedy)`` from the positions ``hidden[b_idx, t_idx]`` that predict the
    tokens ``tgt`` of request ``owner`` (0..n-1)."""
    device = hidden.device
    logp, greedy = _score_rows(model, hidden, torch.tensor(b_idx, device=device),
                               torch.tensor(t_idx, device=device), torch.tensor(tgt, device=device))
    own = torch.tensor(owner, device=device)
    sums = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, own, logp.double())
    misses = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, own, (~greedy).long())
    return [(float(a), bool(m == 0)) for a, m in zip(sums.tolist(), misses.tolist())]


@dataclass
class _Packed:
    """One context and the continuations that share it, laid out in one row."""

    ctx: list[int]
    conts: list[tuple[int, list[int]]]  # (request index, continuation ids)

    @property
    def length(self) -> int:
        return len(self.ctx) + sum(len(k) for _, k in self.conts)


def _pack(pairs: Sequence[tuple[list[int], list[int]]], max_len: int) -> tuple[list[_Packed], list[int]]:
    """Requests grouped by context into rows of at most ``max_len`` tokens; the indices of requests that need
    lm-eval's left truncation (scored one row each)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    alone = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise DataError(f"request {i}: the continuation encodes to no tokens; give every choice some text")
        if len(ctx) + len(cont) > max_len:  # a packed row holds the last target too; lm-eval would cut it
            alone.append(i)
        else:
            groups.setdefault(tuple(ctx), []).append(i)
    rows: list[_Packed] = []
    for ctx, members in groups.items():
        row = _Packed(list(ctx), [])
        for i in members:
            cont = pairs[i][1]
            if row.conts and row.length + len(cont) > max_len:
                rows.append(row)
                row = _Packed(list(ctx), [])
            row.conts.append((i, cont))
        rows.append(row)
    return rows, alone


def _packed_batch(rows: list[_Packed]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids [B, T]``, the 4-D mask ``[B, 1, T, T]`` (True = attend) and ``position_ids [B, T]``.

    In a row, a context token sees the context before it; a continuation's token sees the whole context and its
    own earlier tokens; padding sees only itself (no empty softmax row)."""
    T = max(r.length for r in rows)
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -2, dtype=torch.long)  # -1: context, j >= 0: continuation j, -2: padding
    for b, r in enumerate(rows):
        n = len(r.ctx)
        ids[b, :n] = torch.tensor(r.ctx)
        pos[b, :n] = torch.arange(n)
        seg[b, :n] = -1
        at = n
        for j, (_, k) in enumerate(r.conts):
            ids[b, at:at + len(k)] = torch.tensor(k)
            pos[b, at:at + len(k)] = torch.arange(n, n + len(k))
            seg[b, at:at + len(k)] = j
            at += len(k)
    q, kk = seg[:, :, None], seg[:, None, :]
    idx = torch.arange(T)
    causal = idx[None, :, None] >= idx[None, None, :]
    mask = causal & (((kk == -1) & (q != -2)) | ((q == kk) & (q >= 0)))
    mask |= torch.eye(T, dtype=torch.bool)[None]
    return ids, mask[:, None], pos


@torch.no_grad()
def score_requests(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]],
                   batch_tokens: int = 4096, max_length: int | None = None) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each ``(context ids, continuation ids)``, every context run once per
    packed row (rows batched up to ``batch_tokens`` padded tokens); inputs longer than ``max_length`` (default: the
    model's positions) are left-cut as lm-eval cuts them."""
    max_len = _window(model, max_length)
    device = model.lm_head.weight.device
    rows, alone = _pack(pairs, max_len)
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    rows.sort(key=lambda r: r.length)
    start = 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and (end - start + 1) * rows[end].length <= batch_tokens:
            end += 1
        batch = rows[start:end]
        ids, mask, pos = _packed_batch(batch)
        hidden = model(ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device))
        b_idx, t_idx, tgt, owner = [], [], [], []
        for b, r in enumerate(batch):
            n, at = len(r.ctx), len(r.ctx)
            for i, k in r.conts:
                # the first continuation token is predicted by the context's last position, the rest by their own
                prev = [n - 1] + list(range(at, at + len(k) - 1))
                b_idx += [b] * len(k)
                t_idx += prev
                tgt += k
                owner += [i] * len(k)
                at += len(k)
        local = {i: j for j, i in enumerate(dict.fromkeys(owner))}
        for i, res in zip(local, _gather(model, hidden, b_idx, t_idx, tgt, [local[i] for i in owner], len(local))):
            out[i] = res
        start = end
    if alone:
        for i, res in zip(alone, score_requests_per_choice(model, [pairs[i] for i in alone],
                                                           max_length=max_len)):
            out[i] = res
    return out  # type: ignore[return-value]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal values, as numpy


def item_requests(tokenizer: Tokenizer, item: ChoiceItem, target_delimiter: str = " "
                  ) -> list[tuple[list[int], list[int]]]:
    return [encode_pair(tokenizer, item.context, target_delimiter + c) for c in item.choices]


def score_choices(model: nn.Module, tokenizer: Tokenizer, items: Sequence[ChoiceItem], *,
                  target_delimiter: str = " ", batch_tokens: int = 4096, max_length: int | None = None
                  ) -> list[ChoiceScore]:
    """Score multiple-choice ``items`` with a decoder (``model.eval()`` first): the library call for
    "which answer does the model find most likely".  Each item's context is run once for all its choices."""
    for item in items:
        check_item(item)
    pairs, spans = [], []
    for item in items:
        reqs = item_requests(tokenizer, item, target_delimiter)
        spans.append((len(pairs), len(reqs)))
        pairs += reqs
    results = score_requests(model, pairs, batch_tokens=batch_tokens, max_length=max_length)
    scores = []
    for item, (s, n) in zip(items, spans):
        lls = [results[s + j][0] for j in range(n)]
        chars = [float(len(c)) for c in item.choices]
        nbytes = [float(len(c.encode("utf-8"))) for c in item.choices]
        scores.append(ChoiceScore(
            loglikelihoods=lls, is_greedy=[results[s + j][1] for j in range(n)], answer=item.answer,
            pred=_argmax(lls), pred_norm=_argmax([ll / max(c, 1.0) for ll, c in zip(lls, chars)]),
            pred_bytes=_argmax([ll / max(b, 1.0) for ll, b in zip(lls, nbytes)])))
    return scores


def choice_metrics(scores: Sequence[ChoiceScore]) -> dict[str, float]:
    """Mean ``acc``, ``acc_norm``, ``acc_bytes`` over items, their count ``n``, ``chance`` (mean 1 / choices) and
    ``majority`` (always the same choice index -- the most frequent answer: a label task's majority class)."""
    n = len(scores)
    if n == 0:
        return {"acc": float("nan"), "acc_norm": float("nan"), "acc_bytes": float("nan"), "n": 0,
                "chance": float("nan"), "majority": float("nan")}
    answers = [s.answer for s in scores]
    return {"acc": sum(s.acc for s in scores) / n, "acc_norm": sum(s.acc_norm for s in scores) / n,
            "acc_bytes": sum(s.acc_bytes for s in scores) / n, "n": n,
            "chance": sum(1.0 / len(s.loglikelihoods) for s in scores) / n,
            "majority": max(answers.count(a) for a in set(answers)) / n}
