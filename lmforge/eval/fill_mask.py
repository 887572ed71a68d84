"""Fill-mask: a masked LM's top-k predictions for each [MASK] in a text."""

from __future__ import annotations

from typing import Any

import torch

from lmforge.core.errors import DataError


@torch.no_grad()
def fill_mask(model: torch.nn.Module, tokenizer: Any, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] in ``text`` (left to right), the ``top_k`` most probable tokens and their
    probabilities: ``[[(token, prob), ...], ...]``.  The text is wrapped as ``[CLS] text [SEP]``."""
    mask_id = tokenizer.mask_id
    if mask_id is None or tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise DataError("fill-mask needs a tokenizer with [MASK], [CLS] and [SEP] tokens")
    if top_k < 1:
        raise DataError(f"top_k={top_k} must be >= 1")
    drop = {tokenizer.cls_id, tokenizer.sep_id}
    ids = [i for i in tokenizer.encode(text, add_special_tokens=False) if i not in drop]
    if mask_id not in ids:
        raise DataError(f"the text has no {tokenizer.mask_token} token to fill: {text[:60]!r}")
    ids = [tokenizer.cls_id, *ids, tokenizer.sep_id]
    if len(ids) > model.config.max_seq_len:
        raise DataError(f"the text is {len(ids)} tokens long; the model reads at most {model.config.max_seq_len}")
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], device=model.device)
        positions = x == mask_id  # [1, T]
        probs = model.mlm_logits(model(x), positions).float().softmax(-1)  # [n_masks, V]
    finally:
        model.train(was_training)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[(tokenizer.decode([int(i)]), float(p)) for p, i in zip(ps, ids_)]
            for ps, ids_ in zip(top.values, top.indices)]
