"""Instruction exact match: a decoder answers instruction records greedily and the records' verifiers score it.

A record (:mod:`lmforge.data.world.instructions`, or any dict with ``messages``, ``check`` and ``answer``) is asked
as its messages up to the last assistant turn, in one of two prompt forms:

* ``chat`` -- the model's chat template with the generation prompt (what ``lmforge chat`` sends); generation stops
  on the template's end-of-turn token;
* ``plain`` -- for a model without a template (a pretrained base model): each user turn as ``Q: ...`` and each
  assistant turn as ``A: ...``, the form of the world corpus's quizzes, ending in ``A:`` for the model to continue.

Few-shot prompts put ``shots`` solved demonstrations of the same task type in front (earlier chat turns, or
earlier ``Q:``/``A:`` blocks): what a base model needs to know the task and the answer's form (GPT-3's in-context
setting).  Demonstrations that do not fit the context are dropped from the front; a record that does not fit even
alone is skipped and counted.  The verifier reads the reply's first line (:func:`lmforge.data.world.verifiers.verify`),
so generation stops at the first newline after some text.

Closed-book types can also be scored by likelihood (:func:`choice_accuracy`): the same prompt, then each candidate
answer's log-likelihood as lm-eval scores it (:mod:`lmforge.eval.choice`) -- a base model is judged on what it
knows without having to produce the answer's form unprompted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from lmforge.data.chat import ChatFormat
from lmforge.data.world.instructions import INSTRUCTION_TYPES
from lmforge.data.world.verifiers import verify
from lmforge.eval.choice import ChoiceItem, score_choices
from lmforge.eval.generate import generate, model_context_length
from lmforge.eval.sampling import GenerationConfig

CHAT, PLAIN = "chat", "plain"


@dataclass
class Scored:
    """One record's greedy reply and its verdict."""

    record: dict[str, Any]
    reply: str
    correct: bool
    shots: int = 0


@dataclass
class InstructionScores:
    scored: list[Scored] = field(default_factory=list)
    skipped: int = 0
    """Records whose prompt alone did not fit the model's context with ``max_new_tokens``."""


class Prompter:
    """Token ids of an instruction prompt, in the model's chat template or the plain ``Q:``/``A:`` form."""

    def __init__(self, tokenizer: Any, form: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.form = form or (CHAT if getattr(tokenizer, "chat_template", None) else PLAIN)
        self.format = ChatFormat(tokenizer) if self.form == CHAT else None

    def ids(self, messages: Sequence[dict[str, str]], demos: Sequence[Sequence[dict[str, str]]] = ()) -> list[int]:
        """``demos`` (whole solved conversations) first, then ``messages`` (ending in a user turn)."""
        if self.format is not None:
            return self.format.prompt_ids([m for d in demos for m in d] + list(messages))
        return self.tokenizer.encode(self.text(messages, demos))

    def text(self, messages: Sequence[dict[str, str]], demos: Sequence[Sequence[dict[str, str]]] = ()) -> str:
        """The prompt as text (what likelihood scoring continues with each candidate answer)."""
        if self.format is not None:
            return self.format.render([m for d in demos for m in d] + list(messages), add_generation_prompt=True)[0]
        blocks = ["\n".join(_plain_turn(m) for m in d) for d in demos]
        blocks.append("\n".join(_plain_turn(m) for m in messages) + "\nA:")
        return "\n\n".join(blocks)

    def stop_ids(self) -> list[int] | None:
        return self.format.stop_ids() if self.format is not None else None


def _plain_turn(m: dict[str, str]) -> str:
    return f"{'Q' if m['role'] == 'user' else 'A'}: {m['content']}"


def question(record: dict[str, Any]) -> list[dict[str, str]]:
    """The record's messages before its last assistant turn: what the model is asked."""
    msgs = record["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last]


def solved(record: dict[str, Any], answer_text: str) -> list[dict[str, str]]:
    """A demonstration: the record's question and a reply of ``answer_text``."""
    return question(record) + [{"role": "assistant", "content": answer_text}]


def score_instructions(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]],
                       demos: dict[str, list[list[dict[str, str]]]] | None = None, shots: int = 0,
                       form: str | None = None, max_new_tokens: int = 48, batch_size: int = 32,
                       stop: Sequence[str] = ("\n",)) -> InstructionScores:
    """Greedy replies to ``records`` and their verdicts; ``demos[type]`` supplies up to ``shots`` demonstrations
    per record (the same ones for every record of a type, so a table's few-shot column is one prompt per type).
    ``stop``: the reply ends at these strings (default the first line, which is all a verifier reads; ``()`` lets
    it run to the end of the turn, to see what a reply adds after its answer)."""
    prompter = Prompter(tokenizer, form)
    limit = model_context_length(model) or 1 << 30
    out = InstructionScores()
    prompts: list[tuple[list[int], dict[str, Any], int]] = []
    for rec in records:
        chosen = list((demos or {}).get(rec["type"], []))[:shots]
        ids = prompter.ids(question(rec), chosen)
        while len(ids) + max_new_tokens > limit and chosen:  # the demonstrations farthest from the question go first
            chosen = chosen[1:]
            ids = prompter.ids(question(rec), chosen)
        if len(ids) + max_new_tokens > limit:
            out.skipped += 1
            continue
        prompts.append((ids, rec, len(chosen)))
    stops = prompter.stop_ids()
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop=list(stop),
                           eos_token_id=stops or None)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][0]))  # similar lengths: little left padding
    replies: dict[int, str] = {}
    for k in range(0, len(order), batch_size):
        rows = order[k:k + batch_size]
        with torch.inference_mode():
            results = generate(model, [prompts[i][0] for i in rows], cfg, tokenizer=_LeadingText(tokenizer))
        for i, r in zip(rows, results):
            replies[i] = r.text or ""
    for i, (_, rec, n) in enumerate(prompts):
        reply = replies[i]
        out.scored.append(Scored(rec, reply.strip(), verify(rec, reply), n))
    return out


class _LeadingText:
    """The tokenizer as the engine's decoder, with the stop string "\\n" only counted once some text came: a reply
    that opens with a newline (ChatML's layout, a plain prompt's "A:" followed by one) is not cut to nothing."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.pad_id = getattr(tokenizer, "pad_id", None)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return self._tok.decode(ids, **kwargs).lstrip()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def accuracy(scored: Sequence[Scored]) -> float | None:
    return sum(s.correct for s in scored) / len(scored) if scored else None



# ---- likelihood scoring of closed-book types (a base model judged without having to generate the form) -----------
def candidates(record: dict[str, Any]) -> list[str] | None:
    """The answers a closed-book record is scored among: its type's labels, a number and its neighbours (±1, ±2,
    the verifier's near misses), or the answer and the record's wrong answer (another entity's value of the same
    relation); None when the record has no alternative."""
    answer, check = record["answer"], record["check"]
    if check == "label":
        return list(INSTRUCTION_TYPES[record["type"]].labels)
    if check == "number":
        return [str(n) for n in range(int(answer) - 2, int(answer) + 3) if n >= 0]
    if check == "text" and record.get("wrong") is not None:
        return sorted({str(answer), str(record["wrong"])})
    return None


def choice_accuracy(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]],
                    demos: dict[str, list[list[dict[str, str]]]] | None = None, shots: int = 0
                    ) -> dict[str, dict[str, float]]:
    """Per task type: ``acc`` of picking the right candidate by log-likelihood after the prompt (lm-eval's rule,
    :func:`lmforge.eval.choice.score_choices`), its ``chance`` (mean 1 / candidates) and ``n``."""
    prompter = Prompter(tokenizer)
    delimiter = "" if prompter.form == CHAT else " "  # after "A:" a space; a chat reply starts right away
    items, types = [], []
    for rec in records:
        options = candidates(rec)
        if options is None:
            continue
        right = [i for i, o in enumerate(options) if verify(rec, o)]
        if len(right) != 1:  # no candidate, or several, is the answer: not a multiple-choice question
            continue
        answer = right[0]
        context = prompter.text(question(rec), list((demos or {}).get(rec["type"], []))[:shots])
        items.append(ChoiceItem(context, tuple(options), answer, where=f"{rec['type']}"))
        types.append(rec["type"])
    scores = score_choices(model, tokenizer, items, target_delimiter=delimiter)
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(types):
        picked = [(s, it) for s, it, t in zip(scores, items, types) if t == name]
        out[name] = {"acc": sum(s.acc for s, _ in picked) / len(picked),
                     "chance": sum(1 / len(it.choices) for _, it in picked) / len(picked), "n": len(picked)}
    return out
