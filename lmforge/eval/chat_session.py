"""A conversation with a model in its own chat format: history, a system prompt, one streamed reply per turn.

The prompt of each turn is the whole history rendered by the model's template with the generation prompt, as
token ids (never text re-encoded, which would add a second BOS for tokenizers that add one), and the reply stops
on the format's end-of-turn token or EOS (:meth:`lmforge.data.chat.ChatFormat.stop_ids`).  When the history no
longer fits the model's context with room for the reply, the oldest turns are left out of the prompt.
"""

from __future__ import annotations

import dataclasses
from typing import IO, Any

from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.data.chat import ChatFormat
from lmforge.eval.generate import _TextStream, generate, model_context_length
from lmforge.eval.sampling import GenerationConfig


class ChatSession:
    def __init__(self, model: nn.Module, tokenizer: Any, cfg: GenerationConfig | None = None,
                 system: str | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.format = ChatFormat(tokenizer)
        stops = self.format.stop_ids()
        self.cfg = dataclasses.replace(cfg or GenerationConfig(), eos_token_id=stops or None)
        self.system = system
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def messages(self, history: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + (self.history if history is None else history)

    def _prompt(self) -> list[int]:
        limit = model_context_length(self.model)
        history = list(self.history)
        while True:
            ids = self.format.prompt_ids(self.messages(history))
            if limit is None or len(ids) + self.cfg.max_new_tokens <= limit or len(history) <= 1:
                break
            history = history[2:] if len(history) > 2 else history[1:]  # the oldest exchange first
        if limit is not None and len(ids) + self.cfg.max_new_tokens > limit:
            raise ConfigError(f"the message takes {len(ids)} tokens; with max_new_tokens {self.cfg.max_new_tokens} "
                              f"that exceeds the model's context of {limit}; send a shorter one or lower "
                              f"--max-new-tokens")
        return ids

    def reply(self, text: str, stream: IO[str] | None = None) -> str:
        """The model's answer to ``text`` (streamed to ``stream`` as it comes); both join the history."""
        self.history.append({"role": "user", "content": text})
        try:
            ids = self._prompt()
        except ConfigError:
            self.history.pop()
            raise
        streamer = _TextStream(self.tokenizer, stream, self.cfg.stop) if stream is not None else None
        result = generate(self.model, [ids], self.cfg, tokenizer=self.tokenizer, stream=streamer)[0]
        if streamer is not None:
            streamer.finish(result.text)
        answer = result.text or ""
        self.history.append({"role": "assistant", "content": answer})
        return answer
