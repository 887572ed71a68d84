"""Supervised fine-tuning on conversations: next-token loss on the assistant's tokens only, padded or packed.

An example is a conversation rendered by its chat template (:class:`lmforge.data.chat.ChatFormat`): token ids and
a 0/1 mask of the supervised tokens — every assistant turn with its end-of-turn token, nothing else.  Labels come
from that mask alone, never from comparing ids with the pad id, so a tokenizer whose pad is its EOS still learns to
end its turn.

Truncation (``max_length`` tokens): a longer conversation is cut after the last assistant turn that fits whole
(``truncated`` counts them); one whose first supervised turn does not fit is dropped (``dropped``).  An assistant
turn is never cut part-way, which would teach the model to stop mid-sentence.

Batches: ``packing=False`` right-pads each row; ``packing=True`` puts several conversations in one row, each with
its own positions (restarting at 0) and a block-diagonal causal mask built from ``segment_ids``, so no token
attends across conversations and the loss per conversation equals the conversation run alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.models.heads import chunked_cross_entropy
from lmforge.objectives.base import IGNORE_INDEX, Objective, ObjectiveOutput
from lmforge.objectives.logprobs import skip_padding

Example = tuple[list[int], list[int]]  # (ids, mask)


def cut_to_fit(ids: Sequence[int], mask: Sequence[int], max_length: int) -> Example | None:
    """``(ids, mask)`` cut after the last supervised run that ends within ``max_length`` tokens, or None when the
    first supervised run does not fit."""
    if len(ids) <= max_length:
        return list(ids), list(mask)
    end = None
    for t in range(min(len(ids), max_length), 0, -1):  # a turn ends where a supervised token is last in its run
        if mask[t - 1] and (t == len(mask) or not mask[t]):
            end = t
            break
    if end is None:
        return None
    return list(ids[:end]), list(mask[:end])


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` boolean (True = attend): a query sees earlier keys of its own segment; padding (segment 0)
    is seen by nobody, and every query sees itself so that no row is empty."""
    T = segment_ids.shape[1]
    pos = torch.arange(T, device=segment_ids.device)
    causal = pos[None, :] <= pos[:, None]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
    return ((same & causal) | torch.eye(T, dtype=torch.bool, device=segment_ids.device))[:, None]


class SFTObjective(Objective):
    """Collate (padded or packed) and the summed loss on supervised tokens; ``encode`` renders a conversation."""

    def __init__(self, chat_format: Any, max_length: int, pad_id: int, packing: bool = False,
                 chunk_size: int | None = None) -> None:
        if max_length < 2:
            raise ConfigError(f"max_length={max_length} must be >= 2")
        self.format, self.max_length, self.pad_id = chat_format, int(max_length), int(pad_id)
        self.packing, self.chunk_size = bool(packing), chunk_size
        self.truncated = 0
        self.dropped = 0

    def encode(self, conversation: Any) -> Example | None:
        """A :class:`lmforge.data.chat_data.Conversation` -> ``(ids, mask)`` within ``max_length`` (counted), or
        None when no assistant turn fits (counted in ``dropped``)."""
        enc = self.format.encode(conversation.messages, where=conversation.where, weights=conversation.weights)
        if not any(enc.mask):  # every assistant turn had weight 0
            self.dropped += 1
            return None
        out = cut_to_fit(enc.ids, enc.mask, self.max_length)
        if out is None:
            self.dropped += 1
        elif len(out[0]) < len(enc.ids):
            self.truncated += 1
        return out

    # ---- batches ---------------------------------------------------------------------------------
    @staticmethod
    def _pieces(ex: Example) -> tuple[list[int], list[int]]:
        ids, mask = ex
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]  # labels[t] is token t+1
        return ids[:-1], labels

    def collate(self, raw: Sequence[Example]) -> dict[str, torch.Tensor]:
        examples = [e for e in raw if len(e[0]) >= 2]
        if not examples:
            raise ValueError("SFT collate needs conversations of at least 2 tokens")
        return self._packed(examples) if self.packing else self._padded(examples)

    def _padded(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = [self._pieces(e) for e in examples]
        width = max(len(x) for x, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            input_ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            attention[i, :len(x)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    def pack(self, examples: Sequence[Example]) -> list[list[int]]:
        """Rows of example indices, first fit in order, each row at most ``max_length`` input tokens."""
        rows: list[list[int]] = []
        fill: list[int] = []
        for i, (ids, _m) in enumerate(examples):
            n = len(ids) - 1
            k = next((r for r, used in enumerate(fill) if used + n <= self.max_length), None)
            if k is None:
                rows.append([i])
                fill.append(n)
            else:
                rows[k].append(i)
                fill[k] += n
        return rows

    def _packed(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        plan = self.pack(examples)
        pieces = [self._pieces(e) for e in examples]
        width = max(sum(len(pieces[i][0]) for i in row) for row in plan)
        shape = (len(plan), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        segments = torch.zeros(shape, dtype=torch.long)
        for r, row in enumerate(plan):
            at = 0
            for s, i in enumerate(row, start=1):
                x, y = pieces[i]
                n = len(x)
                input_ids[r, at:at + n] = torch.tensor(x)
                labels[r, at:at + n] = torch.tensor(y)
                positions[r, at:at + n] = torch.arange(n)
                segments[r, at:at + n] = s
                at += n
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "segment_ids": segments,
                "attention_mask": (segments > 0).long()}

    # ---- the seam --------------------------------------------------------------------------------
    def target_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states of a padded or packed batch."""
        # padding's positions are never read (labels -100 there): real_tokens skips their share of the matmuls
        if "segment_ids" in batch:
            return model(batch["input_ids"], attention_mask=block_causal_mask(batch["segment_ids"]),
                         position_ids=batch["position_ids"], **skip_padding(model, batch["segment_ids"] > 0))
        mask = batch.get("attention_mask")
        return model(batch["input_ids"], attention_mask=mask, **skip_padding(model, mask))

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        hidden = self.forward(model, batch)
        kwargs = {"ignore_index": IGNORE_INDEX}
        if self.chunk_size is not None:
            kwargs["chunk_size"] = self.chunk_size
        loss_sum, count = chunked_cross_entropy(hidden, model.lm_head, batch["labels"], **kwargs)
        return ObjectiveOutput(loss_sum=loss_sum, count=count)
