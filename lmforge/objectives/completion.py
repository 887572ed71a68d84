"""Prompt -> completion for decoders: next-token loss on the completion tokens only; the same masking the SFT
stage extends to chat turns.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.core.errors import ConfigError
from lmforge.objectives.base import IGNORE_INDEX
from lmforge.objectives.causal_lm import CausalLMObjective
from lmforge.objectives.encoding import TaskEncoding


class CompletionObjective(TaskEncoding, CausalLMObjective):
    """Decoders: prompt -> completion with next-token loss on the completion tokens only.

    ``encode`` returns ``(prompt_ids, completion_ids)``; the prompt is ``prompt_template`` with the input
    (only the input is truncated, so the template's question/answer cue always survives), the completion
    is ``' ' + target + EOS``.  ``collate`` builds ``prompt + completion`` rows with :class:`CausalLMObjective`'s
    padding and sets the labels of prompt positions to -100.
    """

    def __init__(self, tokenizer: Any, max_length: int, max_target_length: int,
                 prompt_template: str = "{input}\nAnswer:") -> None:
        TaskEncoding.__init__(self, tokenizer, max_length)
        CausalLMObjective.__init__(self, pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        if tokenizer.eos_id is None:
            raise ConfigError("the tokenizer has no EOS token, which ends every completion")
        self.max_target_length = int(max_target_length)
        self.before, self.after = prompt_template.split("{input}", 1)

    def prompt_ids(self, text: str, room: int) -> list[int]:
        head = self.ids(self.before) if self.before else []
        tail = self.ids(self.after) if self.after else []
        body = self.ids(text)
        keep = max(1, room - len(head) - len(tail))
        if len(body) > keep:
            self.truncated += 1
            body = body[:keep]
        return head + body + tail

    def encode(self, rec: dict[str, Any]) -> tuple[list[int], list[int]]:
        y = self.ids(self.tokenizer.word_prefix + rec["target"])
        if len(y) > self.max_target_length - 1:
            self.truncated += 1
            y = y[:self.max_target_length - 1]
        y = y + [self.tokenizer.eos_id]
        return self.prompt_ids(rec["input"], self.max_length + 1 - len(y)), y

    def collate(self, raw: Any) -> dict[str, torch.Tensor]:
        pairs = list(raw)
        batch = CausalLMObjective.collate(self, [p + c for p, c in pairs])
        for i, (p, _c) in enumerate(pairs):
            batch["labels"][i, :len(p) - 1] = IGNORE_INDEX  # labels[t] predicts token t+1: prompt targets off
        return batch
