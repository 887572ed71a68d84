"""Pseudo-perplexity of a masked LM (Salazar et al., 2020, "Masked Language Model Scoring").

A masked LM gives no left-to-right likelihood, but it can score each token given all the others: for a
text ``x_1 … x_n`` (wrapped as ``[CLS] x_1 … x_n [SEP]``) the pseudo-log-likelihood is
``PLL = Σ_i log p(x_i | x with position i replaced by [MASK])`` -- one masked copy per token.  Over a
corpus, ``pseudo_perplexity = exp(-Σ PLL / N)`` with ``N`` the number of scored tokens: every token of every
text -- a text longer than ``max_length - 2`` tokens is scored as consecutive windows of that many, never cut.  The masked copies of all texts are scored in
batches of ``batch_size`` copies (right-padded, with an attention mask), and the MLM head runs only at the
one masked position of each copy.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from lmforge.core.errors import DataError


def encode_for_mlm(tokenizer: Any, text: str) -> list[int]:
    """Content ids of ``text`` (no special tokens) -- the caller cuts them into windows, each wrapped in
    [CLS] ... [SEP]."""
    special = set(tokenizer.special_ids)
    return [i for i in tokenizer.encode(text, add_special_tokens=False) if i not in special]


@torch.no_grad()
def pseudo_perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 512,
                      batch_size: int = 64) -> dict[str, float]:
    """``{"pseudo_perplexity", "tokens", "nll"}`` of ``texts`` under an EncoderLM (see the module doc).

    ``nll`` is ``-Σ PLL`` in nats.  A text without any token is a ``DataError`` naming it.
    """
    if tokenizer.mask_id is None or tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise DataError("pseudo-perplexity needs a tokenizer with [MASK], [CLS] and [SEP] tokens")
    if batch_size < 1 or max_length < 3:
        raise DataError(f"batch_size={batch_size} must be >= 1 and max_length={max_length} >= 3")
    max_length = min(max_length, model.config.max_seq_len)
    rows, width = [], max_length - 2
    for i, text in enumerate(texts):
        ids = encode_for_mlm(tokenizer, text)
        if not ids:
            raise DataError(f"text {i} has no token to score (it is empty or only special tokens)")
        # a whole .txt file is one text: windows, so that every token of it is scored
        rows += [[tokenizer.cls_id, *ids[s:s + width], tokenizer.sep_id] for s in range(0, len(ids), width)]
    copies = [(r, j) for r in range(len(rows)) for j in range(1, len(rows[r]) - 1)]  # (text, masked position)
    was_training, device = model.training, model.device
    model.eval()
    nll = 0.0
    try:
        for start in range(0, len(copies), batch_size):
            chunk = copies[start:start + batch_size]
            width = max(len(rows[r]) for r, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_id if tokenizer.pad_id is not None else 0,
                             dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, (r, j) in enumerate(chunk):
                ids[b, :len(rows[r])] = torch.tensor(rows[r])
                mask[b, :len(rows[r])] = 1
            pos = torch.tensor([j for _, j in chunk])
            target = ids[torch.arange(len(chunk)), pos].clone()
            ids[torch.arange(len(chunk)), pos] = tokenizer.mask_id
            ids, mask, pos, target = ids.to(device), mask.to(device), pos.to(device), target.to(device)
            hidden = model(ids, attention_mask=mask)  # [b, T, d]
            logits = model.mlm_logits(hidden[torch.arange(len(chunk), device=device), pos]).float()  # [b, V]
            nll -= float(torch.log_softmax(logits, -1).gather(1, target[:, None]).sum())
    finally:
        model.train(was_training)
    n = len(copies)
    return {"pseudo_perplexity": math.exp(min(nll / n, 700.0)), "tokens": n, "nll": nll}
