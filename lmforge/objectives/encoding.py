"""What the fine-tuning objectives share: encode-time state (tokenizer, length limit, truncation counter) and
right-padding of token-id lists.

Each task objective follows the seam of :mod:`lmforge.objectives.base` (summed loss + target count, so the
Trainer's global normalisation holds) and adds ``encode(record) -> example`` with truncation to the model's
maximum; ``truncated`` counts the examples that were cut (the report shows it, nothing crashes).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def pad_sequences(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def padding_mask(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    return pad_sequences([[1] * len(s) for s in seqs], 0)


class TaskEncoding:
    """Shared encode-time state: tokenizer, length limit, truncation counter."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self.truncated = 0

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)
