"""Span-corruption loss of a text under an encoder–decoder (T5): `lmforge eval perplexity` for t5 models.

The documents are tokenised (EOS after each), cut into the raw windows of the span-corruption arithmetic
(:func:`lmforge.objectives.span.plan_spans`), corrupted with a fixed seed, and scored on the target tokens
(sentinels, the dropped spans and EOS) with teacher forcing.  Returns the mean target-token loss, its
exponential, the target-token accuracy, the number of target tokens scored and the window (encoder tokens).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from lmforge.core.errors import DataError
from lmforge.eval.pretrain_eval import evaluate_span
from lmforge.objectives.span import SpanConfig, SpanCorruptionSource


def span_corruption_loss(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int | None = None,
                         batch_size: int = 8, seed: int = 0) -> dict[str, float | int]:
    eos = tokenizer.eos_id
    ids: list[int] = []
    for text in texts:
        ids += [i for i in tokenizer.encode(text) if i != eos] + [eos]
    cfg = SpanConfig(inputs_length=max_length or 128)
    stream = np.asarray(ids, dtype=np.int64)
    source = SpanCorruptionSource(stream, cfg, seed=seed, shuffle=False, tokenizer=tokenizer)
    if source.windows.num_windows == 0:
        raise DataError(f"the text has {len(ids)} tokens, too few for one span-corruption window of "
                        f"{source.plan.tokens_length}; pass more text or a smaller --max-length")
    n_batches = source.num_val_batches(batch_size)
    out = evaluate_span(model, source.val_batches(batch_size))
    targets = n_batches and sum(int((b["labels"] != -100).sum()) for b in source.val_batches(batch_size))
    return {"span_loss": out["val_loss"], "perplexity": math.exp(min(out["val_loss"], 50.0)),
            "target_acc": out["val_target_acc"], "tokens": int(targets), "window": cfg.inputs_length}
