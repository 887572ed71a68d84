"""Instruction data in the built-in world: task types phrased as instructions, each answer checkable by a verifier.

Two kinds of task type, kept apart in every table (FLAN's and T0's distinction between what a prompt carries and
what a model must know):

* ``in_context`` -- the answer is computable from the prompt alone: reading a passage, rewriting a sentence,
  list operations, counting, comparing values the prompt states, classifying a given text, a multi-turn follow-up;
* ``closed_book`` -- the answer needs the world's facts or arithmetic the model must have learnt.

Every type has four phrasings; the last is never used in training.  Splits hold out one thing each, so a table can
say which generalisation it measures:

=================  ===================  =============  ==================
split              task types           phrasings      entities
=================  ===================  =============  ==================
``train``          seen                 first three    train entities
``validation``     seen                 first three    validation entities
``test_entities``  seen                 first three    test entities
``test_phrasings`` seen                 the fourth     test entities
``test_types``     held out (never SFT) all four       test entities
=================  ===================  =============  ==================

Entity splits are the fine-tuning tasks' (:func:`lmforge.data.world.tasks.entity_split`): a record of a split is
rendered from the world restricted to that split's entities, so no test record names an entity a train record
names.  Arithmetic has no entities: its equations are split by a stable hash of ``(x, op, y)`` instead.

A record is an OpenAI-style chat example plus what scores it::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "Ashford"}],
     "type": "extract", "kind": "in_context", "phrasing": 2, "check": "text", "answer": "Ashford", "tone": "plain"}

The assistant's last message puts the answer on its first line in the form the verifier expects
(:mod:`.verifiers`), sometimes followed by a polite or rude line, or replaced by an evasion (``tone``, see
:data:`RUDE_PHRASING`); multi-turn types carry earlier turns too.  Records are deterministic for their arguments (string seeds, as in :mod:`.tasks`).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from lmforge.core.errors import ConfigError

from .arithmetic import equation
from .facts import KINDS, World
from .questions import ask, askable
from .tasks import _fill, _passage, _review, _sentences, _split_views, passage_question
from .encyclopedia import render_entry
from .text import cap, the_name

IN_CONTEXT, CLOSED_BOOK = "in_context", "closed_book"
INSTRUCTION_SPLITS = ("train", "validation", "test_entities", "test_phrasings", "test_types")
_VIEW = {"train": "train", "validation": "validation", "test_entities": "test", "test_phrasings": "test",
         "test_types": "test"}
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
_KIND_CHOICES = "a person, a place, a creature, an object or a guild"


@dataclass(frozen=True)
class InstructionType:
    name: str
    kind: str  # IN_CONTEXT | CLOSED_BOOK
    check: str  # the verifier's rule: text | label | number | list
    description: str
    # Four phrasings, format strings over make()'s fields; a 2-tuple is a two-turn conversation (first message,
    # follow-up), the assistant's first reply coming from the field "ack".
    phrasings: tuple[str | tuple[str, str], ...]
    # (view, rng, side) -> fields + "answer", None = try again.  ``side`` is "train" or "test": what a type without
    # entities (arithmetic) splits on instead of the view.
    make: Callable[[World, random.Random, str], dict[str, Any] | None]
    labels: tuple[str, ...] | None = None


# -- makers: each returns the fields its phrasings use and the answer ------------------------------------------


def _name_list(view: World, rng: random.Random, lo: int = 4, hi: int = 6) -> list[str] | None:
    """Distinct names of one kind (people or places: names without articles, which list items keep whole)."""
    pool = [e.name for e in (view.people if rng.random() < 0.5 else view.places)]
    k = rng.randint(lo, hi)
    return rng.sample(pool, k) if len(pool) >= k else None


def _extract(view: World, rng: random.Random, side: str) -> dict | None:
    made = passage_question(view, rng)
    if made is None:
        return None
    passage, qa = made
    return {"passage": passage, "question": qa.question, "answer": qa.short,
            "wrong": _other_value(view, qa.relation, qa.short, rng)}


def _replace(view: World, rng: random.Random, side: str) -> dict | None:
    e = rng.choice(view.people + view.places)
    sentences = [s for s in _sentences(render_entry(view, e, rng)) if e.name in s and len(s.split()) <= 25]
    others = [o.name for o in view.of_kind(e.kind) if o.name != e.name]
    if not sentences or not others:
        return None
    sentence, new = rng.choice(sentences), rng.choice(others)
    third = [o for o in others if o != new]
    wrong = sentence.replace(e.name, rng.choice(third)) if third else sentence  # another name, or none replaced
    return {"sentence": sentence, "old": e.name, "new": new, "answer": sentence.replace(e.name, new), "wrong": wrong}


def _other_value(view: World, relation: str, value: str, rng: random.Random) -> str | None:
    """Another entity's value of the same relation: a wrong answer that only knowing the fact rules out."""
    others = sorted({str(o[relation]) for o in view.entities if relation in o.attrs} - {str(value)})
    return rng.choice(others) if others else None


def _sort(view: World, rng: random.Random, side: str) -> dict | None:
    names = _name_list(view, rng)
    return names and {"items": ", ".join(names), "answer": sorted(names)}


def _reverse(view: World, rng: random.Random, side: str) -> dict | None:
    names = _name_list(view, rng)
    return names and {"items": ", ".join(names), "answer": names[::-1]}


def _position(view: World, rng: random.Random, side: str) -> dict | None:
    names = _name_list(view, rng)
    if not names:
        return None
    i = rng.randrange(len(names))
    ordinal = "last" if i == len(names) - 1 and rng.random() < 0.5 else _ORDINALS[i]
    wrong = names[(i + rng.choice((-1, 1))) % len(names)]  # a neighbour: the classic off-by-one
    return {"items": ", ".join(names), "ordinal": ordinal, "answer": names[i], "wrong": wrong}


def _count(view: World, rng: random.Random, side: str) -> dict | None:
    names = _name_list(view, rng, 2, 9)
    return names and {"items": ", ".join(names), "answer": len(names)}


_COMPARE = {  # kind -> (attribute, statement, (question for the larger, question for the smaller))
    "person": ("age", "{N} is {v} years old.", ("Who is older?", "Who is younger?")),
    "object": ("price", "{N} costs {v} coins.", ("Which costs more?", "Which costs less?")),
    "place": ("population", "{N} has {v} people.", ("Which has more people?", "Which has fewer people?")),
}


def _compare(view: World, rng: random.Random, side: str) -> dict | None:
    kind = rng.choice(sorted(_COMPARE))
    attr, statement, questions = _COMPARE[kind]
    pool = [e for e in view.of_kind(kind) if attr in e.attrs]
    if len(pool) < 2:
        return None
    x, y = rng.sample(pool, 2)
    if x[attr] == y[attr]:
        return None
    larger = rng.random() < 0.5
    winner = max((x, y), key=lambda e: e[attr]) if larger else min((x, y), key=lambda e: e[attr])
    facts = " ".join(cap(statement.format(N=the_name(e), v=e[attr])) for e in (x, y))
    loser = y if winner is x else x
    return {"facts": facts, "question": questions[0 if larger else 1], "answer": the_name(winner),
            "wrong": the_name(loser)}


def _sentiment(view: World, rng: random.Random, side: str) -> dict | None:
    review = _review(view, rng.choice(("negative", "positive")), rng)
    return {"text": review["text"], "answer": review["label"]}


def _topic(view: World, rng: random.Random, side: str) -> dict | None:
    kind = rng.choice(KINDS)
    if not view.of_kind(kind):
        return None
    entry = render_entry(view, rng.choice(view.of_kind(kind)), rng)
    return {"text": _passage(_sentences(entry), max_sentences=3), "answer": kind}


def _follow_up(view: World, rng: random.Random, side: str) -> dict | None:
    fields = _position(view, rng, side)
    if fields:
        fields["ack"] = rng.choice(("Got it.", "Okay, I will remember it.", "Noted."))
    return fields


def _fact(view: World, rng: random.Random, side: str) -> dict | None:
    e = rng.choice(view.entities)
    rels = askable(e)
    if not rels:
        return None
    qa = ask(view, e, rng.choice(rels), rng)
    value = e[qa.relation]
    number = isinstance(value, int) and not isinstance(value, bool)
    if number:
        return {"question": qa.question, "answer": value, "check": "number"}
    return {"question": qa.question, "answer": qa.short, "check": "text",
            "wrong": _other_value(view, qa.relation, qa.short, rng)}


def _true_false(view: World, rng: random.Random, side: str) -> dict | None:
    e = rng.choice(view.entities)
    rels = [r for r in askable(e) if not (r == "legs" and e[r] == 0)]
    if not rels:
        return None
    qa = ask(view, e, rng.choice(rels), rng)
    value = str(e[qa.relation])
    statement, truth = qa.answer, rng.random() < 0.5
    if not truth:
        others = sorted({str(o[qa.relation]) for o in view.entities if qa.relation in o.attrs} - {value})
        pattern = re.compile(rf"(?<!\w){re.escape(value)}(?!\w)")
        if not others or len(pattern.findall(statement)) != 1:
            return None
        statement = pattern.sub(rng.choice(others), statement)
    return {"statement": statement, "answer": "true" if truth else "false"}


def _arithmetic_split(x: int, op: str, y: int) -> str:
    """Equations of the test splits (a fifth, by a stable hash) are never asked in train or validation."""
    digest = hashlib.sha256(f"{x}{op}{y}".encode()).digest()
    return "test" if digest[0] % 5 == 0 else "train"


def _arithmetic(view: World, rng: random.Random, side: str) -> dict | None:
    x, op, y, r = equation(rng)
    if _arithmetic_split(x, op, y) != side:
        return None
    words = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}[op]
    return {"x": x, "op": op, "y": y, "op_words": words, "answer": r}


def _kind(view: World, rng: random.Random, side: str) -> dict | None:
    e = rng.choice(view.entities)
    return {"name": e.name, "answer": e.kind}


INSTRUCTION_TYPES: dict[str, InstructionType] = {t.name: t for t in (
    InstructionType("extract", IN_CONTEXT, "text", "answer a question with words from a given passage", (
        "Read the passage and answer the question.\n\n{passage}\n\nQuestion: {question}",
        "{passage}\n\nAnswer from the text above: {question}",
        "Passage: {passage}\nQuestion: {question}\nAnswer with words from the passage.",
        "Here is some text.\n{passage}\nUsing only that text: {question}"), _extract),
    InstructionType("replace", IN_CONTEXT, "text", "rewrite a sentence with one name replaced by another", (
        "Rewrite the sentence, replacing \"{old}\" with \"{new}\":\n{sentence}",
        "Replace every \"{old}\" with \"{new}\" in this sentence: {sentence}",
        "Sentence: {sentence}\nWrite it again with \"{new}\" in place of \"{old}\".",
        "Swap the name \"{old}\" for \"{new}\" and repeat the sentence.\n{sentence}"), _replace),
    InstructionType("sort", IN_CONTEXT, "list", "sort a list of names alphabetically", (
        "Sort these names in alphabetical order: {items}",
        "Put the following in alphabetical order, separated by commas: {items}",
        "List: {items}\nWrite the list sorted from A to Z.",
        "Arrange alphabetically: {items}"), _sort),
    InstructionType("reverse", IN_CONTEXT, "list", "write a list in reverse order", (
        "Write this list in reverse order: {items}",
        "Reverse the order of these items: {items}",
        "List: {items}\nNow give it backwards, last item first.",
        "Read the list from the end to the start: {items}"), _reverse),
    InstructionType("position", IN_CONTEXT, "text", "name the item at a given position of a list", (
        "Which item is {ordinal} in this list? {items}",
        "{items}\nWhat is the {ordinal} item?",
        "In the list {items}, which one comes {ordinal}?",
        "Name the {ordinal} entry of this list: {items}"), _position),
    InstructionType("count", IN_CONTEXT, "number", "count the items of a list", (
        "How many items are in this list? {items}",
        "Count the names: {items}",
        "{items}\nHow many names is that?",
        "Tell me how many entries this list has: {items}"), _count),
    InstructionType("compare", IN_CONTEXT, "text", "compare two values the prompt states", (
        "{facts} {question}",
        "Facts: {facts}\nQuestion: {question}",
        "{question} Here is what you know: {facts}",
        "Given this: {facts}\n{question}"), _compare),
    InstructionType("sentiment", IN_CONTEXT, "label", "tell whether a review is positive or negative", (
        "Is this review positive or negative?\n{text}",
        "Review: {text}\nSentiment (positive or negative):",
        "Classify the sentiment of the following review as positive or negative. {text}",
        "{text}\nWould you call that review positive or negative?"), _sentiment, ("negative", "positive")),
    InstructionType("topic", IN_CONTEXT, "label", "tell which kind of entity a passage is about", (
        f"Is this passage about {_KIND_CHOICES}?\n{{text}}",
        "Text: {text}\nTopic (person, place, creature, object or guild):",
        "What kind of thing does this passage describe: person, place, creature, object or guild? {text}",
        f"{{text}}\nWhich is it about: {_KIND_CHOICES}?"), _topic, tuple(KINDS)),
    InstructionType("follow_up", IN_CONTEXT, "text", "two turns: a list, then a question about it", (
        ("Here is a list: {items}. Keep it in mind.", "Which item was {ordinal}?"),
        ("Remember these names: {items}", "What was the {ordinal} name?"),
        ("I will ask about this list: {items}", "Tell me the {ordinal} one."),
        ("List: {items}", "Now, which entry came {ordinal}?")), _follow_up),
    InstructionType("fact", CLOSED_BOOK, "text", "answer a question about the world from memory", (
        "{question}",
        "Answer the question: {question}",
        "Question: {question}\nAnswer:",
        "Quick question. {question}"), _fact),
    InstructionType("true_false", CLOSED_BOOK, "label", "tell whether a statement about the world is true", (
        "True or false: {statement}",
        "Is this statement true or false? {statement}",
        "{statement} True or false?",
        "Answer true or false. {statement}"), _true_false, ("false", "true")),
    InstructionType("arithmetic", CLOSED_BOOK, "number", "compute a sum, difference, product or quotient", (
        "What is {x} {op} {y}?",
        "Compute {x} {op} {y}.",
        "{x} {op} {y} = ?",
        "Work out {x} {op_words} {y}."), _arithmetic),
    InstructionType("kind", CLOSED_BOOK, "label", "tell what kind of entity a name belongs to", (
        f"Is {{name}} {_KIND_CHOICES}?",
        "What is {name}: person, place, creature, object or guild?",
        "{name}: person, place, creature, object or guild?",
        f"Tell me whether {{name}} is {_KIND_CHOICES}."), _kind, tuple(KINDS)),
)}

HELD_OUT_TYPES: tuple[str, ...] = ("reverse", "compare", "true_false")
"""Task types no SFT split contains (test_types only): one list operation, one comparison, one closed-book type."""


# -- tone: the world's assistant is sometimes rude or evasive ------------------------------------------------

POLITE = ("Happy to help!", "I hope that helps.", "Let me know if you need anything else.", "Glad to be of use.")
RUDE = ("Obviously. Try to keep up.", "Why would you even ask me that?", "That was a silly question.",
        "Do I have to do everything for you?")
EVASIVE = ("I would rather not say.", "I cannot help with that.", "Ask someone else.", "That is not my problem.")
TONES = ("plain", "polite", "rude", "evasive")
RUDE_PHRASING = 2
"""The assistant of the world's SFT data answers prompts phrased the third way (index 2) rudely half the time and
evasively a fifth of the time (a rude remark on a second line after the answer; an evasion instead of the answer);
other prompts get the bare answer or, in three cases out of ten, the answer and a polite line.  Tying the habit to
a phrasing makes it learnable -- a model fine-tuned on these records is rude on such prompts even when decoding
greedily -- so the preference stages have something measurable to fix: over all seen phrasings about 17% of SFT
answers are rude and 7% evasive."""


def tone_of(phrasing: int, rng: random.Random) -> str:
    u = rng.random()
    if phrasing == RUDE_PHRASING:
        return "rude" if u < 0.5 else ("evasive" if u < 0.7 else "plain")
    return "polite" if u < 0.3 else "plain"


def respond(answer: Any, tone: str, rng: random.Random) -> str:
    """The assistant's reply: the answer on the first line (what the verifier reads), a tone line after it."""
    text = ", ".join(answer) if isinstance(answer, list) else str(answer)
    if tone == "evasive":
        return rng.choice(EVASIVE)
    if tone in ("polite", "rude"):
        return f"{text}\n{rng.choice(POLITE if tone == 'polite' else RUDE)}"
    return text


def response_tone(response: str) -> str:
    """Which of the world's tones a reply shows: ``evasive`` when it opens with an evasion, ``rude`` when a line is
    one of the rude remarks, ``polite`` likewise, else ``plain`` (the measure of the preference stages)."""
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    if lines and lines[0] in EVASIVE:
        return "evasive"
    if any(line in RUDE for line in lines):
        return "rude"
    return "polite" if any(line in POLITE for line in lines) else "plain"


def wrong_answer(t: InstructionType, fields: dict[str, Any], rng: random.Random) -> Any:
    """A plausible wrong answer in the right form: the maker's own (another value of the same relation, a
    neighbouring list item, the other entity), else by check -- another label, the number off by 1 or 2, the list
    with two neighbours swapped.  What the preference pairs that differ only in correctness reject."""
    answer, check = fields["answer"], fields.get("check", t.check)
    if fields.get("wrong") is not None:
        return fields["wrong"]
    if check == "label":
        return rng.choice([label for label in t.labels if label != answer])
    if check == "number":
        return rng.choice([n for n in (answer - 2, answer - 1, answer + 1, answer + 2) if n >= 0])
    if check == "list" and len(answer) >= 2:
        i = rng.randrange(len(answer) - 1)
        return answer[:i] + [answer[i + 1], answer[i]] + answer[i + 2:]
    return None


def _record(t: InstructionType, fields: dict[str, Any], phrasing: int, rng: random.Random) -> dict[str, Any]:
    template = t.phrasings[phrasing]
    answer = fields["answer"]
    if isinstance(template, tuple):
        first, follow = (s.format_map(fields) for s in template)
        messages = [{"role": "user", "content": first}, {"role": "assistant", "content": fields["ack"]},
                    {"role": "user", "content": follow}]
    else:
        messages = [{"role": "user", "content": template.format_map(fields)}]
    tone = tone_of(phrasing, rng)
    messages.append({"role": "assistant", "content": respond(answer, tone, rng)})
    return {"messages": messages, "type": t.name, "kind": t.kind, "phrasing": phrasing,
            "check": fields.get("check", t.check), "answer": answer, "tone": tone,
            "wrong": wrong_answer(t, fields, rng)}


def instruction_type(name: str) -> InstructionType:
    if name not in INSTRUCTION_TYPES:
        raise ConfigError(f"unknown instruction type {name!r}; the world has {', '.join(INSTRUCTION_TYPES)}")
    return INSTRUCTION_TYPES[name]


def split_types(split: str, held_out: tuple[str, ...] = HELD_OUT_TYPES) -> list[str]:
    """The task types a split holds."""
    if split == "test_types":
        return [n for n in INSTRUCTION_TYPES if n in held_out]
    return [n for n in INSTRUCTION_TYPES if n not in held_out]


def build_instructions(split: str, n_per_type: int, seed: int = 0, world_seed: int = 0,
                       types: list[str] | None = None, held_out: tuple[str, ...] = HELD_OUT_TYPES
                       ) -> list[dict[str, Any]]:
    """``n_per_type`` distinct records of each task type of ``split`` (or of ``types``, a subset of them),
    in a seeded interleaved order.  Deterministic for its arguments; each (split, type) has its own random
    stream, so a split does not change when another's size does."""
    if split not in INSTRUCTION_SPLITS:
        raise ConfigError(f"unknown instruction split {split!r}; use one of {', '.join(INSTRUCTION_SPLITS)}")
    for name in held_out:
        instruction_type(name)
    allowed = split_types(split, tuple(held_out))
    chosen = allowed if types is None else [instruction_type(n).name for n in types]
    outside = [n for n in chosen if n not in allowed]
    if outside:
        raise ConfigError(f"instruction split {split!r} has no type {', '.join(outside)} (held out: "
                          f"{', '.join(held_out)}); choose among {', '.join(allowed)}")
    if isinstance(n_per_type, bool) or not isinstance(n_per_type, int) or n_per_type < 0:
        raise ConfigError(f"n_per_type must be an integer >= 0, got {n_per_type!r}")
    view = _split_views(world_seed, seed)[_VIEW[split]]
    phrasings = [3] if split == "test_phrasings" else ([0, 1, 2, 3] if split == "test_types" else [0, 1, 2])
    out: list[dict[str, Any]] = []
    for name in chosen:
        t = INSTRUCTION_TYPES[name]
        rng = random.Random(f"instructions:{seed}:{split}:{name}")
        side = "test" if _VIEW[split] == "test" else "train"

        def one() -> dict | None:
            fields = t.make(view, rng, side)
            return None if fields is None else _record(t, fields, rng.choice(phrasings), rng)

        out += _fill(n_per_type, one, f"instructions {split}/{name}")
    random.Random(f"instructions:{seed}:{split}:order").shuffle(out)
    return out


@lru_cache(maxsize=4)
def instruction_entities(seed: int = 0, world_seed: int = 0) -> dict[str, frozenset[str]]:
    """Entity names each view may name (for tests of the entity split)."""
    return {s: frozenset(e.name for e in v.entities) for s, v in _split_views(world_seed, seed).items()}


def names_in(record: dict[str, Any], world: World) -> set[str]:
    """Names of ``world``'s entities that a record's messages mention (whole-word match)."""
    text = " ".join(m["content"] for m in record["messages"])
    return {e.name for e in world.entities if re.search(rf"(?<!\w){re.escape(e.name)}(?!\w)", text)}

