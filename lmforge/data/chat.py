"""Chat templates: a model's ``chat_template`` rendered as transformers' ``apply_chat_template`` renders it, and
the supervised (assistant) tokens of a conversation.

Rendering follows transformers' rules so that the ids a model is trained on are the ids it is served with: a
jinja2 ``ImmutableSandboxedEnvironment`` (templates from the Hub are untrusted code) with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block tag that records the character
span it renders, the globals ``raise_exception`` and ``strftime_now``, a ``tojson`` filter that does not escape
HTML, and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...) as variables.  The rendered text is
encoded without the tokenizer's own special tokens (the template writes them).

Assistant masks: a template with ``{% generation %}`` blocks names its supervised text itself; a token is
supervised when it overlaps such a span (transformers' rule, so ``assistant_masks`` agree).  Otherwise each
assistant turn's span is found by rendering prefixes: the conversation up to the turn with the generation prompt,
then up to and including the turn.  That works only when rendering is *incremental* — the text of earlier turns
does not change once later ones are added.  A template that rewrites the past (one that drops earlier reasoning,
say) is refused for prefix masking by name, rather than silently mis-masked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.core.errors import DataError

ROLES = ("system", "user", "assistant")

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
# ChatML, the default for models without a template; the {% generation %} block marks each assistant reply and
# its end-of-turn token (the newline after it is layout, not something the model must say)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(DataError):
    """A chat template that does not compile, raises while rendering, or cannot be masked."""


# ---------------------------------------------------------------------------------------- the environment
class Generation(Extension):
    """``{% generation %}…{% endgeneration %}``: renders its body and, while a render is tracked (the environment's
    ``tracking`` is ``(blocks rendered so far, spans)``), appends the body's ``(start, end)`` character span."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_span", []), [], [], body).set_lineno(lineno)

    def _span(self, caller):
        text = caller()
        track = getattr(self.environment, "tracking", None)
        if track is not None:
            start = sum(len(b) for b in track[0])
            track[1].append((start, start + len(text)))
        return text


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached by its text): transformers' environment, options and globals."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.tracking = None  # (blocks rendered so far, spans) during a tracked render
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile (line {e.lineno}: {e.message}); fix "
                                f"chat_template") from None


def has_generation_blocks(source: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


def render(source: str, messages: Sequence[dict[str, Any]], variables: dict[str, Any] | None = None,
           add_generation_prompt: bool = False, where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The text of ``messages`` under the template and the character spans of its ``{% generation %}`` blocks.
    A template that raises (``raise_exception`` or any jinja error) is a one-line ChatTemplateError at ``where``."""
    template = compile_template(source)
    env = template.environment
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers: None keys dropped
    env.tracking = (blocks, spans)
    try:
        for block in template.generate(messages=msgs, add_generation_prompt=add_generation_prompt,
                                       **(variables or {})):
            blocks.append(block)
    except jinja2.exceptions.TemplateError as e:
        at = f"{where}: " if where else ""
        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ChatTemplateError(f"{at}the chat template raised: {said}; "
                                f"fix the conversation or chat_template") from None
    finally:
        env.tracking = None
    return "".join(blocks), spans


# ---------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """A conversation as tokens: ``ids`` and ``mask`` (1 = supervised: an assistant token the loss sees)."""

    ids: list[int]
    mask: list[int]
    text: str


def spans_to_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character range overlaps a span (spans and offsets both in order)."""
    mask = [0] * len(offsets)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0] and end > start:
            mask[i] = 1
    return mask


class ChatFormat:
    """A tokenizer and its chat template: conversations to token ids and assistant masks.

    ``variables`` are what the template sees besides ``messages`` (the tokenizer's special tokens by role, as
    transformers passes them).  ``masking``: ``generation`` (the template's blocks) or ``prefix``."""

    def __init__(self, tokenizer: Any, template: str | None = None) -> None:
        template = template if template is not None else tokenizer.chat_template
        if isinstance(template, list):  # transformers' named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str) or not template:
            raise ChatTemplateError("the model's tokenizer has no chat_template; add one to its tokenizer_config.json "
                                    "or train it with `lmforge sft` (which adds ChatML)")
        compile_template(template)
        self.tokenizer = tokenizer
        self.template = template
        self.masking = "generation" if has_generation_blocks(template) else "prefix"
        self.variables = {f"{r}_token": getattr(tokenizer, f"{r}_token")
                          for r in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
                          if getattr(tokenizer, f"{r}_token") is not None}

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
               where: str = "") -> tuple[str, list[tuple[int, int]]]:
        return render(self.template, messages, self.variables, add_generation_prompt, where)

    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer.hf.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def prompt_ids(self, messages: Sequence[dict[str, Any]], where: str = "") -> list[int]:
        """Token ids of ``messages`` with the generation prompt: what a model continues to answer."""
        text, _ = self.render(messages, add_generation_prompt=True, where=where)
        return self._tokens(text)[0]

    def encode(self, messages: Sequence[dict[str, Any]], where: str = "",
               weights: Sequence[int] | None = None) -> Encoded:
        """Ids and mask of a whole conversation; ``weights`` (one per message, 0 or 1): a 0 takes an assistant
        turn out of the loss."""
        text, spans = self.render(messages, where=where)
        assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        keep = [weights is None or int(weights[i]) != 0 for i in assistant]
        if self.masking == "generation":
            if not all(keep):
                if len(spans) != len(assistant):
                    raise ChatTemplateError(f"{where}: per-message weights need one {{% generation %}} block per "
                                            f"assistant message, but the template rendered {len(spans)} for "
                                            f"{len(assistant)}; drop the weights or fix chat_template")
                spans = [s for s, k in zip(spans, keep) if k]
        else:
            spans = [s for s, k in zip(self._prefix_spans(messages, assistant, text, where), keep) if k]
        ids, offsets = self._tokens(text)
        return Encoded(ids, spans_to_mask(offsets, spans), text)

    def _prefix_spans(self, messages: Sequence[dict[str, Any]], assistant: list[int], full: str,
                      where: str) -> list[tuple[int, int]]:
        """Each assistant turn's span from prefix renders, its trailing whitespace left out (layout after the
        end-of-turn token, as ChatML's newline); refused when earlier turns render differently later."""
        spans = []
        for i in assistant:
            before, _ = self.render(messages[:i], add_generation_prompt=True, where=where) if i else ("", [])
            upto, _ = self.render(messages[:i + 1], where=where)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ChatTemplateError(
                    f"{where}: the chat template renders earlier turns differently once later turns are added "
                    f"(message {i}), so its assistant tokens cannot be found by rendering prefixes; add "
                    f"{{% generation %}} blocks around the assistant text in chat_template")
            end = len(upto.rstrip())
            spans.append((len(before), max(end, len(before))))
        return spans

    def end_of_turn(self) -> int | None:
        """The token that ends an assistant turn: the first special token rendered after a reply (``<|im_end|>``,
        ``<|eot_id|>``, ``</s>``); None when a reply is followed by none."""
        reply = "Reply."
        probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": reply}]
        try:
            text, _ = self.render(probe)
        except ChatTemplateError:
            return None
        after = text.rfind(reply) + len(reply)
        ids, offsets = self._tokens(text)
        special = set(self.tokenizer.special_ids) - {self.tokenizer.bos_id}
        return next((t for t, (s, _e) in zip(ids, offsets) if s >= after and t in special), None)

    def stop_ids(self) -> list[int]:
        """What generation stops on: the end-of-turn token first, then EOS (once each)."""
        ids = [self.end_of_turn(), self.tokenizer.eos_id]
        return list(dict.fromkeys(i for i in ids if i is not None))
