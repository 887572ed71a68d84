"""Dialogues: question-and-answer exchanges about facts, in three shapes.

* a quiz ("Q: ... / A: ...") over random facts,
* two unnamed speakers ("A:" / "B:") talking about one entity, follow-ups by pronoun,
* two friends from the world chatting by name about their families, purchases and pets.

Every answer is the true value from the fact store (via :mod:`questions`), occasionally preceded by
a hedge or replaced by an honest "I don't know" so answers do not all look alike.
"""

from __future__ import annotations

import random

from . import vocab
from .entity import Entity
from .facts import World
from .fields import fields_for
from .questions import ask, askable
from .text import cap

_KIND_WEIGHTS = (("person", 6), ("place", 2), ("creature", 1), ("object", 1), ("guild", 1))
_HEDGES = ("", "", "", "", "Let me think. ", "I know that one. ", "Oh, ", "Well, ")
# relations whose bare value is not a good answer on its own ("Stehan harp." -> "A Stehan harp.")
_LOWER_AFTER_HEDGE = ("The ", "It ", "He ", "She ", "His ", "Her ", "Its ")
_NO_SHORT = ("owns", "pet", "occupation", "class", "category", "settlement", "trade")
_OPENERS = (  # (opening line, fitting replies)
    ("Do you know {name}?", ("Yes, I do.", "A little.", "Of course.")),
    ("Tell me about {name}.", ("Sure.", "Happy to.", "What do you want to know?")),
    ("I keep hearing about {name}.", ("I know a little about that.", "Ask me anything.")),
    ("What do you know about {name}?", ("A little.", "Quite a lot, in fact.")),
)
_THANKS = ("Thank you!", "Thanks, that helps.", "I see. Thank you.", "Good to know.")


def _random_entity(world: World, rng: random.Random) -> Entity | None:
    kinds = [k for k, w in _KIND_WEIGHTS for _ in range(w) if world.of_kind(k)]
    if not kinds:
        return None
    return rng.choice(world.of_kind(rng.choice(kinds)))


def _quiz(world: World, rng: random.Random) -> str:
    lines = []
    if rng.random() < 0.4:
        lines.append(rng.choice(("Quiz", "Questions and answers", "Test your knowledge")))
    want = rng.randint(3, 6)
    for _ in range(4 * want):
        if len(lines) >= want:
            break
        e = _random_entity(world, rng)
        rels = askable(e) if e is not None else []
        if not rels:
            continue
        qa = ask(world, e, rng.choice(rels), rng)
        short_ok = qa.relation not in _NO_SHORT
        answer = cap(qa.short) + "." if short_ok and rng.random() < 0.3 else qa.answer
        lines.append(f"Q: {qa.question}\nA: {answer}")
    return "\n".join(lines)


def _about_one(world: World, rng: random.Random) -> str:
    e = _random_entity(world, rng)
    rels = askable(e) if e is not None else []
    if not rels:
        return _quiz(world, rng)
    name = e.name if e.kind in ("person", "place") else "the " + e.name
    opener, replies = rng.choice(_OPENERS)
    lines = [f"A: {opener.format(name=name)}", f"B: {rng.choice(replies)}"]
    unknown = False
    rng.shuffle(rels)
    for i, rel in enumerate(rels[: rng.randint(2, 4)]):
        qa = ask(world, e, rel, rng, pronoun=i > 0 and e.kind == "person")
        lines.append(f"A: {qa.question}")
        if rng.random() < 0.06:
            lines.append("B: I don't know, sorry.")
            unknown = True
        else:
            hedge = rng.choice(_HEDGES)
            answer = qa.answer
            if hedge.endswith(", ") and answer.startswith(_LOWER_AFTER_HEDGE):
                answer = answer[0].lower() + answer[1:]
            lines.append(f"B: {hedge}{answer}")
    lines.append("A: Never mind. Thank you anyway." if unknown else f"A: {rng.choice(_THANKS)}")
    return "\n".join(lines)


def _friends(world: World, rng: random.Random) -> str:
    pairs = [p for p in (rng.choice(world.people) for _ in range(10)) if "friend" in p.attrs]
    if not pairs:
        return _about_one(world, rng)
    a_p = pairs[0]
    b_p = world[str(a_p["friend"])]
    fa, fb = fields_for(world, a_p), fields_for(world, b_p)
    A, B = str(fa["first"]), str(fb["first"])
    reply = rng.choice(("Very well, thank you.", "I am fine.", "Busy, as always."))
    lines = [f"{A}: Hello, {B}! How are you?", f"{B}: {reply}"]
    # (who is asked, topic): each person can be asked about their work and what they have
    topics = [(f, t) for f in (fa, fb) for t in ("occ", "sib", "pet", "owns") if t in f]
    rng.shuffle(topics)
    for of, topic in topics[: rng.randint(2, 3)]:
        other, speaker = (A, B) if of is fa else (B, A)
        if topic == "occ":
            lines += [f"{speaker}: Are you still working as {of['a_occ']}?",
                      f"{other}: Yes, I {vocab.OCCUPATIONS[str(of['occ'])][3]} every day."]
        elif topic == "sib":
            lines.append(f"{speaker}: How is your {of['sib_rel']} {of['sib_first']}?")
            if "sib_home" in of:
                he = "She" if of["sib_rel"] == "sister" else "He"
                lines.append(f"{other}: {he} is well. {of['sib_first']} still lives in {of['sib_home']}.")
            else:
                lines.append(f"{other}: {of['sib_first']} is well, thank you.")
        elif topic == "pet":
            lines += [f"{speaker}: And how is your {of['pet']}?",
                      f"{other}: Always hungry! It eats {of['pet_diet']} all day."]
        else:
            lines += [f"{speaker}: Is that {of['a_owns']}?",
                      f"{other}: Yes, it is. It is made of {of['owns_mat']} and cost me {of['owns_price']} coins."]
    lines.append(f"{A}: {rng.choice(('Well, I must go.', 'It was good to see you.', 'Goodbye, then.'))}")
    lines.append(f"{B}: {rng.choice(('Goodbye!', 'See you soon.', 'Take care.'))}")
    return "\n".join(lines)


def render_dialogue(world: World, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        return _quiz(world, rng)
    if r < 0.75:
        return _about_one(world, rng)
    return _friends(world, rng)
