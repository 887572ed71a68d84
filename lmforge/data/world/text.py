"""Small English helpers shared by the renderers (articles, lists, pronouns, references)."""

from __future__ import annotations

import random
import string

from . import vocab
from .entity import Entity


def a(phrase: str) -> str:
    """Prefix the right indefinite article: a('owl') -> 'an owl'."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def join(items: list[str], conj: str = "and") -> str:
    """"A", "A and B", "A, B and C"."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def pronouns(entity: Entity) -> tuple[str, str, str]:
    """(subject, object, possessive) pronouns, lower case."""
    gender = entity.get("gender", "neuter")
    he, him, his, _, _ = vocab.PRONOUNS[str(gender)]
    return he, him, his


def sibling_word(entity: Entity) -> str:
    """"sister" or "brother": the word for ``entity`` when it is someone's sibling."""
    return vocab.PRONOUNS[str(entity["gender"])][3]


def the_name(entity: Entity) -> str:
    """How the entity is named mid-sentence: "Alva Dorn", "Vasko", "the Orlen lamp"."""
    if entity.kind in ("person", "place"):
        return entity.name
    return "the " + entity.name


def plural_creature(name: str) -> str:
    if name.endswith(("fox", "finch", "moth")):
        return name + "es"
    if name.endswith(("mouse",)):
        return name[:-5] + "mice"
    if name.endswith(("deer", "trout", "carp", "pike")):
        return name
    if name.endswith("wolf"):
        return name[:-1] + "ves"
    return name + "s"


def plural_object(entity: Entity) -> str:
    """"Orlen lamps" for the object kind "Orlen lamp"."""
    brand, category = entity.name.split(" ", 1)
    return f"{brand} {vocab.OBJECT_CATEGORIES[category][0]}"


def ref(entity: Entity, rng: random.Random, first: bool) -> tuple[str, str]:
    """(subject, possessive) references for the start of a sentence, varied after the first one.

    The first mention uses the full name; later ones mix pronouns with the short name so entries do
    not repeat one form, and every variant still names the same entity.
    """
    if entity.kind == "person":
        if first:
            return entity.name, entity.name + "'s"
        r = rng.random()
        if r < 0.55:
            he, _, his = pronouns(entity)
            return cap(he), cap(his)
        short = entity.name if r < 0.7 else str(entity["first_name"])
        return short, short + "'s"
    name = the_name(entity)
    if first or rng.random() < 0.4:
        return cap(name), cap(name) + "'s"
    return "It", "Its"


def number_word(n: int) -> str:
    return vocab.NUMBER_WORDS[n] if 0 <= n < len(vocab.NUMBER_WORDS) else str(n)


Template = tuple[str, frozenset[str]]


def compile_templates(texts: tuple[str, ...] | list[str]) -> tuple[Template, ...]:
    """Pair each format string with the field names it needs, parsed once at import time."""
    formatter = string.Formatter()
    return tuple((t, frozenset(f for _, f, _, _ in formatter.parse(t) if f)) for t in texts)


def pick(rng: random.Random, templates: tuple[Template, ...], fields: dict[str, object]) -> str | None:
    """Format a random template whose fields are all available (None if none is)."""
    chosen = pick_template(rng, templates, fields)
    return None if chosen is None else chosen[0].format_map(fields)


def pick_template(rng: random.Random, templates: tuple[Template, ...],
                  fields: dict[str, object]) -> Template | None:
    """A random template whose fields are all available, with its field set (None if none is)."""
    keys = fields.keys()
    usable = [t for t in templates if keys >= t[1]]
    return rng.choice(usable) if usable else None
