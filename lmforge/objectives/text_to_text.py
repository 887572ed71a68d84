"""Text-to-text (T5): ``input EOS`` -> ``target EOS`` with teacher forcing; the loss is
:class:`~lmforge.objectives.seq2seq.Seq2SeqObjective`'s.
"""

from __future__ import annotations

from typing import Any

from lmforge.core.errors import ConfigError
from lmforge.objectives.encoding import TaskEncoding
from lmforge.objectives.seq2seq import Seq2SeqObjective


class TextToTextObjective(TaskEncoding, Seq2SeqObjective):
    """T5: ``input EOS`` -> ``target EOS``; collate and loss are :class:`Seq2SeqObjective`'s."""

    def __init__(self, tokenizer: Any, max_length: int, max_target_length: int) -> None:
        TaskEncoding.__init__(self, tokenizer, max_length)
        Seq2SeqObjective.__init__(self, pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        if tokenizer.eos_id is None:
            raise ConfigError("the tokenizer has no EOS token, which T5 inputs and targets end with")
        self.max_target_length = int(max_target_length)

    def encode(self, rec: dict[str, Any]) -> tuple[list[int], list[int]]:
        # the target as running text (" 38", not "38"), so copying an input word copies its token ids
        x, y = self.ids(rec["input"]), self.ids(self.tokenizer.word_prefix + rec["target"])
        if len(x) > self.max_length - 1 or len(y) > self.max_target_length - 1:
            self.truncated += 1
        eos = self.tokenizer.eos_id
        return x[:self.max_length - 1] + [eos], y[:self.max_target_length - 1] + [eos]
