"""Short reviews of objects and places, with a ground-truth sentiment label.

:func:`make_review` is the label-bearing generator later tasks build sentiment classification on.
The label is decided first; every evaluative sentence is then drawn to agree with it, using plain
praise/complaint, negated phrases whose polarity is the opposite of their head word ("not bad at
all" is positive, "not worth the money" negative) and contrasts whose *second* clause carries the
label ("the colour is lovely, but it broke within a week" is negative).  Factual details inside a
review (price, material, colour, where it is made) come from the fact store.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .entity import Entity
from .facts import World
from lmforge.core.errors import DataError

from . import vocab
from .text import a, sibling_word

LABELS: tuple[str, ...] = ("negative", "positive")


@dataclass(frozen=True)
class Review:
    text: str
    label: str  # "positive" or "negative"
    subject: str  # entity name
    author: str  # person name ("" when anonymous)


# aspect -> (extra praise, extra complaints) on top of the generic pools below
_OBJ_ASPECTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "it": (("well made", "sturdy"), ("badly made", "flimsy")),
    "the finish": (("smooth",), ("rough",)),
    "the colour": (("bright", "beautiful"), ("dull", "ugly")),
    "the work": (("careful",), ("careless", "sloppy")),
    "the price": (("fair", "low"), ("too high",)),
}
_PLACE_ASPECTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "the food": (("delicious", "tasty"), ("cold", "bland")),
    "the inn": (("cosy", "clean"), ("noisy", "dirty")),
    "the market": (("busy and cheerful",), ("empty", "too expensive")),
    "the streets": (("clean", "quiet"), ("dirty", "crowded")),
    "the people": (("friendly", "kind"), ("rude", "unfriendly")),
    "the view": (("beautiful",), ("grey and dull",)),
    "the service": (("quick", "friendly"), ("slow", "rude")),
}
_PLURAL = ("the streets", "the people")
_GOOD = ("great", "lovely", "excellent", "wonderful", "very good", "pleasant", "better than I expected")
_BAD = ("poor", "awful", "terrible", "disappointing", "very bad", "worse than I expected")
_NEG_OF_BAD = ("not bad at all", "not a problem at all", "not disappointing in the least", "not bad, not bad at all")
_NEG_OF_GOOD = ("not good", "not as nice as I hoped", "not pleasant at all", "far from great", "not good at all")

_OPEN_OBJ = ("I bought {a_N} in {made_in}.", "I have owned {a_N} for a year now.", "I paid {price} coins for {a_N}.")
_OPEN_GIFT = "My {rel} gave me {a_N} as a gift."  # anonymous reviews only: a named owner bought theirs
_OPEN_PLACE = (
    "I spent a week in {N} last {season}.", "We stopped in {N} on our way to {nb}.",
    "I visited {N} for the first time this {season}.", "My {rel} took me to {N} for a few days.",
)
_VERDICT = {
    "positive": ("I would happily buy another.", "I would recommend it to anyone.", "Five stars from me.",
                 "I am very happy with it.", "It was worth every coin."),
    "negative": ("I would not buy another.", "I cannot recommend it.", "I want my money back.",
                 "I am not happy with it.", "What a waste of coins.", "It was not worth the money."),
}
_PLACE_VERDICT = {
    "positive": ("I will surely go back.", "I would recommend a visit to anyone.", "We had a wonderful time.",
                 "I cannot wait to return."),
    "negative": ("I will not go back.", "I would not recommend a visit.", "We left a day early.",
                 "I cannot say I enjoyed it."),
}


def _word(aspect: str, table: dict, positive: bool, rng: random.Random) -> str:
    good, bad = table[aspect]
    pool = (_GOOD + good) if positive else (_BAD + bad)
    return rng.choice(pool)


def _aspect_sentence(table: dict, x: str, label: str, rng: random.Random, used: list[str]) -> str:
    """One evaluative sentence about aspect ``x`` agreeing with ``label`` (plain, negated, or a
    contrast whose second clause, about an aspect not yet mentioned, carries the label)."""
    used.append(x)
    others = [k for k in table if k != x and k != "it"]  # "..., but it was" would be ambiguous
    y = rng.choice([k for k in others if k not in used] or others)
    vx = "were" if x in _PLURAL else "was"
    vy = "were" if y in _PLURAL else "was"
    positive = label == "positive"
    kind = rng.random()
    if kind >= 0.7:
        used.append(y)
    if kind < 0.45:
        return f"{x.capitalize()} {vx} {_word(x, table, positive, rng)}."
    if kind < 0.7:
        word = rng.choice(_NEG_OF_BAD if positive else _NEG_OF_GOOD)
        return f"{x.capitalize()} {vx} {word}."
    return (f"{x.capitalize()} {vx} {_word(x, table, not positive, rng)}, "
            f"but {y} {vy} {_word(y, table, positive, rng)}.")


def make_review(world: World, rng: random.Random, label: str | None = None, kind: str | None = None,
                with_rating: bool = False) -> Review:
    """A review with a known label; ``kind`` is "object" or "place" (random if None).

    ``with_rating`` appends "Rating: n out of 5" (4-5 positive, 1-2 negative); tasks that classify
    sentiment should leave it off so the label must be read from the words.
    """
    if label is None:
        label = rng.choice(LABELS)
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    kind = kind or ("object" if rng.random() < 0.55 and world.objects else "place")
    if kind not in ("object", "place"):
        raise ValueError(f"kind must be 'object' or 'place', got {kind!r}")
    if not world.of_kind(kind):
        raise DataError(f"the world has no {kind} to review")
    subject: Entity = rng.choice(world.of_kind(kind))
    # A named author must be consistent with the facts: only an owner reviews an object ("I bought
    # ..."), and "my sister" is said only by someone who has one.
    pool = world.referrers("owns", subject.name) if kind == "object" else world.people
    author = rng.choice(pool) if pool and rng.random() < 0.7 else None
    rels = ["neighbour"]
    if author is None:
        rels += ["brother", "sister", "friend"]
    else:
        rels += ["friend"] * ("friend" in author.attrs)
        if "sibling" in author.attrs:
            rels.append(sibling_word(world[str(author["sibling"])]))
    fields = {"season": rng.choice(vocab.SEASONS), "rel": rng.choice(rels)}
    if kind == "object":
        fields.update(a_N=a(subject.name), price=subject["price"])
        opens = [t for t in _OPEN_OBJ if "{made_in}" not in t or "made_in" in subject.attrs]
        if author is None:
            opens.append(_OPEN_GIFT)
        if "made_in" in subject.attrs:
            fields["made_in"] = subject["made_in"]
        opening = rng.choice(opens)
        sentences = [opening.format_map(fields)]
        facts = [f"It is made of {subject['material']} and it is {subject['colour']}.", f"Mine is {subject['colour']}."]
        if "gift" not in opening and "paid" not in opening:
            facts.append(f"It cost me {subject['price']} coins.")
        sentences.append(rng.choice(facts))
        aspects, verdicts = _OBJ_ASPECTS, _VERDICT
    else:
        fields.update(N=subject.name, nb=subject.get("neighbor", "the coast"))
        sentences = [rng.choice(_OPEN_PLACE).format_map(fields)]
        aspects, verdicts = _PLACE_ASPECTS, _PLACE_VERDICT
    used: list[str] = []
    for _ in range(rng.randint(1, 3)):
        fresh = [k for k in aspects if k not in used]
        if not fresh:
            break
        sentences.append(_aspect_sentence(aspects, rng.choice(fresh), label, rng, used))
    sentences.append(rng.choice(verdicts[label]))
    text = " ".join(sentences)
    if with_rating:
        stars = rng.choice((4, 5)) if label == "positive" else rng.choice((1, 2))
        text += f"\nRating: {stars} out of 5"
    return Review(text, label, subject.name, author.name if author else "")


def render_review(world: World, rng: random.Random) -> str | None:
    """A review as a pretraining document: a heading, the text and sometimes a rating."""
    if not world.objects and not world.places:
        return None
    review = make_review(world, rng, with_rating=rng.random() < 0.5)
    subject = world[review.subject]
    what = ("the " + subject.name) if subject.kind == "object" else subject.name
    if review.author:
        head = rng.choice((f"Review of {what} by {review.author}", f"{review.author} on {what}",
                           f"A review by {review.author}"))
    else:
        head = rng.choice((f"Review of {what}", "A review", f"What I think of {what}"))
    return f"{head}\n\n{review.text}"
