"""Perplexity and bits-per-byte of a causal LM: the standard fixed-length (sliding window) method.

The text is tokenised whole (BOS only where the tokenizer itself adds it) into ``x_0 … x_{n-1}``.
Windows of ``max_length`` tokens start at ``0, stride, 2·stride, …`` (the last one is cut at ``n``; no
window starts after the one that reaches ``n``).  In a window ``[b, e)`` the tokens that an earlier
window already scored are context only, and the window's first token ``x_b`` is never scored (nothing in
the window predicts it); every other token ``x_i`` with ``i ≥ max(previous e, b + 1)`` is scored by the
window's prediction from ``x_b … x_{i-1}``.  So:

* ``stride < max_length`` (overlapping windows): every token but ``x_0`` is scored exactly once, each
  with at least ``max_length - stride`` tokens of context once past the first window;
* ``stride == max_length``: disjoint windows; every window's first token is unscored.

This is exactly the loop of the Hugging Face perplexity guide (labels ``-100`` on context tokens, the
model's shift dropping each window's first label).  Results:

* ``nll`` — the sum of ``-ln p(x_i | context)`` over all scored tokens (a sum over tokens, not a mean
  of window means), in nats;
* ``tokens`` — the number of scored tokens; ``perplexity = exp(nll / tokens)``;
* ``bytes`` — UTF-8 bytes of the *scored text*, ``bits_per_byte = nll / (ln 2 · bytes)``.

The scored text, exactly: the text is split into consecutive byte spans, one per token, at the end
offsets the tokenizer reports (token ``i`` owns the bytes after token ``i-1``'s end up to its own end;
a token that adds no text — BOS, EOS, a token holding only part of a multi-byte character whose bytes
were already counted — owns 0 bytes; bytes after the last token's end go to the last token).  The scored
text is the union of the scored tokens' spans; with overlapping windows that is everything after the
first token.  Several documents (a ``list[str]``) are joined into one token stream with the tokenizer's
EOS token between consecutive documents — the same stream the training loader packs — so later
documents are conditioned on earlier ones; those EOS tokens are scored (predicting the end of a
document is part of the model) and own 0 bytes.

:func:`unigram_perplexity` is the floor any trained model must beat: an add-one-smoothed unigram model
fitted on training tokens.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lmforge.core.errors import ConfigError, DataError
from lmforge.eval.generate import model_context_length
from lmforge.objectives.logprobs import head_logprobs

__all__ = ["bits_per_byte", "perplexity", "perplexity_of_tokens", "unigram_perplexity", "sliding_windows"]


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows ``(begin, end, first_scored)`` over ``n_tokens`` tokens: the window is
    ``tokens[begin:end]`` and it scores ``tokens[first_scored:end]`` (empty windows are left out)."""
    if max_length < 2:
        raise ConfigError(f"perplexity max_length={max_length} must be >= 2 (a window needs context)")
    if not 1 <= stride <= max_length:
        raise ConfigError(f"perplexity stride={stride} must be between 1 and max_length={max_length}")
    out = []
    prev_end = 0
    begin = 0
    while begin < n_tokens:
        end = min(begin + max_length, n_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
        begin += stride
    return out


def _resolve_lengths(model: nn.Module, max_length: int | None, stride: int | None) -> tuple[int, int]:
    model_max = model_context_length(model)
    if max_length is None:
        if model_max is None:
            raise ConfigError("perplexity needs max_length: the model's config names no maximum sequence length")
        max_length = model_max
    if model_max is not None and max_length > model_max:
        raise ConfigError(f"perplexity max_length={max_length} exceeds the model's context of {model_max} "
                          f"positions; use --max-length {model_max} or less")
    if stride is None:
        stride = max_length
    sliding_windows(0, max_length, stride)  # validates
    return int(max_length), int(stride)


def _as_1d(tokens: Any) -> torch.Tensor | np.ndarray:
    """A 1-D tensor or numpy array (a memmap shard stays a memmap: windows are converted one by one)."""
    if isinstance(tokens, torch.Tensor):
        return tokens.reshape(-1)
    if isinstance(tokens, np.ndarray):
        return tokens.reshape(-1)
    return np.asarray(tokens, dtype=np.int64).reshape(-1)


def _window(tokens: torch.Tensor | np.ndarray, begin: int, end: int) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens[begin:end].long().cpu()
    return torch.from_numpy(np.asarray(tokens[begin:end], dtype=np.int64))


@torch.inference_mode()
def _score(model: nn.Module, tokens: torch.Tensor | np.ndarray, max_length: int, stride: int,
           batch_size: int) -> tuple[float, int, list[tuple[int, int, int]]]:
    """Sum of NLL (nats, float64) and count over the scored tokens; also the windows used.

    Logits are computed only at scored positions, in chunks of about 32M fp32 values, so a large
    vocabulary or batch never materialises ``[batch, max_length, V]`` logits."""
    n = int(tokens.shape[0])
    if batch_size < 1:
        raise ConfigError(f"perplexity batch_size={batch_size} must be >= 1")
    windows = sliding_windows(n, max_length, stride)
    if not windows:
        raise DataError(f"the text is {n} token(s) long; perplexity needs at least 2 tokens to score one")
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    # Windows of equal length run as one batch (all but possibly the last have length max_length).
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == (w[1] - w[0]):
            groups[-1].append(w)
        else:
            groups.append([w])
    was_training = model.training
    model.eval()
    try:
        for group in groups:
            L = group[0][1] - group[0][0]
            ids = torch.stack([_window(tokens, b, e) for b, e, _ in group]).to(device)
            hidden = model(ids)  # [b, L, d]
            # Hidden position j predicts token j + 1; window (b, e, f) scores tokens f..e-1 -> j in [f-b-1, L-1).
            j = torch.arange(L - 1, device=device)
            lo = torch.tensor([f - b - 1 for b, _, f in group], device=device)
            sel = j[None, :] >= lo[:, None]  # [b, L-1]
            h = hidden[:, :-1][sel]  # [m, d]
            targets = ids[:, 1:][sel]
            count += int(targets.numel())
            logp, _ = head_logprobs(h, model.lm_head, targets)  # the post-training log-prob helper, chunked
            total -= logp.double().sum()
    finally:
        model.train(was_training)
    return float(total), count, windows


def _scored_mask(n: int, windows: list[tuple[int, int, int]]) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for _, e, f in windows:
        mask[f:e] = True
    return mask


def bits_per_byte(nll: float, n_bytes: float) -> float:
    """``nll`` (summed nats) per byte of the scored text, in bits."""
    return nll / (math.log(2) * n_bytes)


def _summary(nll: float, count: int) -> dict[str, float | int]:
    return {"perplexity": math.exp(nll / count), "nll": nll, "tokens": count}


def perplexity_of_tokens(model: nn.Module, token_ids: Any, max_length: int | None = None,
                         stride: int | None = None, batch_size: int = 8,
                         token_bytes: Any = None) -> dict[str, float | int]:
    """Perplexity of a token stream (list, numpy array or memmap shard, tensor) by the sliding-window
    method of the module doc.  Returns ``perplexity``, ``nll`` (summed nats) and ``tokens`` (scored);
    with ``token_bytes`` (the UTF-8 bytes each token owns) also ``bytes`` and ``bits_per_byte``."""
    max_length, stride = _resolve_lengths(model, max_length, stride)
    tokens = _as_1d(token_ids)
    n = int(tokens.shape[0])
    nll, count, windows = _score(model, tokens, max_length, stride, batch_size)
    out = _summary(nll, count)
    if token_bytes is not None:
        tb = np.asarray(token_bytes, dtype=np.int64).reshape(-1)
        if tb.shape[0] != n:
            raise ConfigError(f"token_bytes has {tb.shape[0]} entries for {n} tokens")
        n_bytes = int(tb[_scored_mask(n, windows)].sum())
        out["bytes"] = n_bytes
        out["bits_per_byte"] = bits_per_byte(nll, n_bytes) if n_bytes else float("nan")
    return out


def _encode_with_bytes(tokenizer: Any, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` (as ``tokenizer.encode`` gives them) and the UTF-8 bytes each token owns."""
    raw = text.encode("utf-8")
    hf = getattr(tokenizer, "hf", None)
    if hf is None or not hasattr(hf, "encode"):
        # No offsets available: token i owns the growth of the decoded prefix (exact, O(n^2) decodes;
        # only for tokenizers that are not a tokenizers.Tokenizer wrapper).
        ids = list(tokenizer.encode(text))
        ends = [len(tokenizer.decode(ids[: i + 1]).encode("utf-8")) for i in range(len(ids))]
        ends_arr = np.maximum.accumulate(np.asarray(ends, dtype=np.int64)) if ids else np.zeros(0, np.int64)
    else:
        enc = hf.encode(text)
        ids = list(enc.ids)
        if not ids:
            return ids, np.zeros(0, dtype=np.int64)
        arr = np.frombuffer(raw, dtype=np.uint8)
        char_start = np.flatnonzero((arr & 0xC0) != 0x80)  # byte offset of each character
        char_to_byte = np.append(char_start, len(raw)).astype(np.int64)
        char_ends = np.asarray([o[1] for o in enc.offsets], dtype=np.int64)
        ends_arr = np.maximum.accumulate(char_to_byte[np.clip(char_ends, 0, len(char_to_byte) - 1)])
    if len(ids):
        ends_arr = ends_arr.copy()
        ends_arr[-1] = max(int(ends_arr[-1]), len(raw))
    starts = np.concatenate([[0], ends_arr[:-1]]) if len(ids) else np.zeros(0, np.int64)
    return ids, (ends_arr - starts).astype(np.int64)


def perplexity(model: nn.Module, tokenizer: Any, text: str | Sequence[str], max_length: int | None = None,
               stride: int | None = None, batch_size: int = 8) -> dict[str, float | int]:
    """Perplexity and bits-per-byte of ``text`` (one string, or documents joined by EOS) under ``model``.

    ``max_length`` defaults to the model's maximum sequence length, ``stride`` to ``max_length``
    (disjoint windows; a smaller stride gives every scored token more context and is the more faithful
    estimate).  Returns ``perplexity``, ``bits_per_byte``, ``tokens`` (scored), ``nll`` (summed nats)
    and ``bytes`` (of the scored text) — all defined in the module doc.
    """
    docs = [text] if isinstance(text, str) else list(text)
    docs = [d for d in docs if d]
    if not docs:
        raise DataError("perplexity got no text: the input is empty")
    ids: list[int] = []
    nbytes: list[np.ndarray] = []
    eos = getattr(tokenizer, "eos_id", None)
    if len(docs) > 1 and eos is None:
        raise ConfigError("scoring several documents needs an EOS token to join them; the tokenizer has none")
    for i, doc in enumerate(docs):
        if i > 0:
            ids.append(int(eos))
            nbytes.append(np.zeros(1, dtype=np.int64))
        d_ids, d_bytes = _encode_with_bytes(tokenizer, doc)
        ids.extend(d_ids)
        nbytes.append(d_bytes)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and ids and max(ids) >= vocab:
        raise ConfigError(f"the tokenizer produced id {max(ids)} but the model's vocabulary has {vocab} entries; "
                          f"use the tokenizer saved with the model")
    return perplexity_of_tokens(model, ids, max_length, stride, batch_size, token_bytes=np.concatenate(nbytes))


def unigram_perplexity(train_tokens: Any, eval_tokens: Any, vocab_size: int) -> dict[str, float | int]:
    """Perplexity of ``eval_tokens`` under an add-one (Laplace) smoothed unigram model of ``train_tokens``:
    ``p(v) = (count_train(v) + 1) / (n_train + vocab_size)``.  Every eval token is scored (a unigram
    model needs no context).  Returns ``perplexity``, ``nll`` (summed nats) and ``tokens``."""
    train = _as_1d(train_tokens)
    ev = _as_1d(eval_tokens)
    if ev.shape[0] == 0:
        raise DataError("unigram_perplexity got no eval tokens")
    step = 1 << 24  # chunks: a memmap shard of any size is counted without an int64 copy of it

    def counts_of(arr: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
        counts = np.zeros(vocab_size, dtype=np.int64)
        for s in range(0, int(arr.shape[0]), step):
            chunk = _window(arr, s, s + step).numpy()
            if chunk.size and (chunk.min() < 0 or chunk.max() >= vocab_size):
                raise ConfigError(f"{name} tokens hold ids outside [0, {vocab_size}); pass the right vocab_size")
            counts += np.bincount(chunk, minlength=vocab_size)
        return counts

    train_counts = counts_of(train, "train")
    eval_counts = counts_of(ev, "eval")
    logp = np.log(train_counts + 1.0) - math.log(int(train.shape[0]) + vocab_size)
    nll = float(-(eval_counts * logp).sum())
    return _summary(nll, int(ev.shape[0]))
