"""Questions about single facts, with a full-sentence answer and a short (exact-match) answer.

Dialogues use these for pretraining text; later QA/instruction/verifier tasks reuse the same table so
the questions a model is evaluated on are phrased the way pretraining phrased them.  ``{name}`` is
the subject as a question names it ("Alva Dorn", "the Orlen lamp", or a pronoun in a follow-up),
``{poss}`` its possessive, ``{Subj}`` the answer's subject.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .entity import Entity
from .facts import World
from .text import a, cap, compile_templates, pronouns, sibling_word, the_name


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # a full sentence
    short: str  # the bare value, for exact-match scoring
    subject: str
    relation: str


# relation -> ((question, full answer), ...); short answers come from the value itself.
_QA: dict[str, tuple[tuple[str, str], ...]] = {
    "home": (("Where does {name} live?", "{Subj} lives in {v}."),
             ("In which town does {name} live?", "{Subj} lives in {v}."),
             ("Where is {poss} home?", "{Subj} lives in {v}.")),
    "occupation": (("What does {name} do for a living?", "{Subj} works as {a_v}."),
                   ("What is {poss} job?", "{Subj} is {a_v}."),
                   ("What is {poss} trade?", "{Subj} works as {a_v}.")),
    "birth_year": (("When was {name} born?", "{Subj} was born in {v}."),
                   ("In what year was {name} born?", "{Subj} was born in {v}.")),
    "age": (("How old is {name}?", "{Subj} is {v} years old."),),
    "birthplace": (("Where was {name} born?", "{Subj} was born in {v}."),
                   ("Which town was {name} born in?", "{Subj} was born in {v}.")),
    "guild": (("Which guild does {name} belong to?", "{Subj} belongs to the {v}."),
              ("What guild is {name} a member of?", "{Subj} is a member of the {v}.")),
    "sibling": (("Who is {poss} {rel}?", "{Poss} {rel} is {v}."),
                ("Does {name} have a {rel}?", "Yes, {Poss_l} {rel} is {v}.")),
    "friend": (("Who is {poss} best friend?", "{Poss} best friend is {v}."),),
    "pet": (("What pet does {name} keep?", "{Subj} keeps {a_v}."),
            ("What kind of pet does {name} have?", "{Subj} has {a_v}.")),
    "owns": (("What does {name} own?", "{Subj} owns {a_v}."),),
    "mayor_of": (("Which town is {name} the mayor of?", "{Subj} is the mayor of {v}."),),
    "region": (("In which region is {name}?", "{Subj} is in the {v} region."),
               ("Which region is {name} in?", "{Subj} lies in the {v} region.")),
    "population": (("How many people live in {name}?", "{v} people live in {name}."),
                   ("What is the population of {name}?", "{Subj} has a population of {v}.")),
    "founded": (("When was {name} founded?", "{Subj} was founded in {v}."),
                ("In what year was {name} founded?", "{Subj} was founded in {v}.")),
    "mayor": (("Who is the mayor of {name}?", "The mayor of {name} is {v}."),),
    "neighbor": (("What is the nearest town to {name}?", "The nearest town to {name} is {v}."),),
    "settlement": (("Is {name} a village, a town or a city?", "{Subj} is {a_v}."),),
    "habitat": (("Where does {name} live?", "{Subj} lives in {v}."),
                ("Where can you find {name}?", "{Subj} is found in {v}.")),
    "diet": (("What does {name} eat?", "{Subj} eats {v}."),
             ("What does {name} feed on?", "{Subj} feeds on {v}.")),
    "legs": (("How many legs does {name} have?", "{Subj} has {v} legs."),),
    "lifespan": (("How long can {name} live?", "{Subj} can live for {v} years."),),
    "class": (("What kind of animal is {name}?", "{Subj} is {a_v}."),),
    "material": (("What is {name} made of?", "{Subj} is made of {v}."),
                 ("What material is {name} made from?", "{Subj} is made from {v}.")),
    "colour": (("What colour is {name}?", "{Subj} is {v}."),),
    "made_in": (("Where is {name} made?", "{Subj} is made in {v}."),
                ("Which town makes {name}?", "{Subj} is made in {v}.")),
    "price": (("How much does {name} cost?", "{Subj} costs {v} coins."),
              ("What is the price of {name}?", "{Subj} costs {v} coins.")),
    "category": (("What kind of thing is {name}?", "{Subj} is {a_v}."),),
    "trade": (("Which trade does {name} serve?", "{Subj} is a guild of {v}s."),),
    "seat": (("Where does {name} meet?", "{Subj} meets in {v}."),
             ("Where is the hall of {name}?", "The hall of {name} is in {v}.")),
    "leader": (("Who leads {name}?", "{Subj} is led by {v}."),
               ("Who is the leader of {name}?", "The leader of {name} is {v}.")),
    "members": (("How many members does {name} have?", "{Subj} has {v} members."),),
}
_COMPILED = {rel: tuple(zip(compile_templates([q for q, _ in pairs]), compile_templates([x for _, x in pairs])))
             for rel, pairs in _QA.items()}

ASKABLE: dict[str, tuple[str, ...]] = {
    "person": ("home", "occupation", "birth_year", "age", "birthplace", "guild", "sibling", "friend",
               "pet", "owns", "mayor_of"),
    "place": ("region", "population", "founded", "mayor", "neighbor", "settlement"),
    "creature": ("habitat", "diet", "legs", "lifespan", "class", "colour"),
    "object": ("material", "colour", "made_in", "price", "category"),
    "guild": ("trade", "seat", "founded", "leader", "members"),
}


def askable(entity: Entity) -> list[str]:
    """Relations of ``entity`` that have a value (and hence a question)."""
    return [r for r in ASKABLE[entity.kind] if r in entity.attrs]


def ask(world: World, entity: Entity, relation: str, rng: random.Random, pronoun: bool = False) -> QA:
    """A question about ``entity``'s ``relation`` with its true answer.

    ``pronoun=True`` names the subject by pronoun ("Where does she live?") for follow-up turns.
    """
    value = entity.attrs[relation]
    pronoun = pronoun and entity.kind != "place"  # "the mayor of it" reads badly
    name = the_name(entity)
    he, _, his = pronouns(entity)
    f: dict[str, object] = {"v": value, "a_v": a(str(value)), "name": he if pronoun else name,
                            "poss": his if pronoun else name + "'s"}
    f["Subj"] = cap(he) if pronoun or rng.random() < 0.5 else cap(name)
    f["Poss"] = cap(his) if pronoun else cap(name) + "'s"
    f["Poss_l"] = his
    if relation == "sibling":
        f["rel"] = sibling_word(world[str(value)])
    pairs = _COMPILED[relation]
    q_t, a_t = pairs[rng.randrange(len(pairs))]
    question = q_t[0].format_map(f)
    answer = a_t[0].format_map(f)
    if relation == "legs" and value == 0:
        answer = answer.replace(" 0 legs", " no legs")
    short = str(value)
    return QA(question, answer, short, entity.name, relation)

