"""Generate the entities of a world from one ``random.Random``.

Order matters for determinism and for consistency: places first (everything lives somewhere), then
guilds (seated in a place), creatures and objects, then people, and last the relations that need
everyone present (friends, mayors, guild leaders and member counts).  Each step draws from the same
rng in a fixed order, so a seed always reproduces the same world.
"""

from __future__ import annotations

import ast
import functools
import math
import random
import re
from pathlib import Path

from . import vocab
from .entity import Entity
from .names import NameMaker

# Words a generated name must never equal, so names are always recognisable as names: the word
# tables, every word in the renderers' string literals (see _template_words) and a few common words.
_RESERVED: tuple[str, ...] = (
    tuple(vocab.OCCUPATIONS) + vocab.COLOURS + tuple(vocab.OBJECT_CATEGORIES) + vocab.REGIONS
    + tuple(vocab.TERRAINS) + vocab.SEASONS + vocab.WEATHER + vocab.FRUITS + vocab.NUMBER_WORDS
    + ("guild", "town", "city", "village", "there", "these", "those", "where", "which", "while",
       "today", "later", "other", "about", "after", "before", "never", "often", "maybe", "sister",
       "brother", "mother", "father", "market", "friend", "money", "coins", "river", "water", "stone",
       "wood", "sure", "mayor", "leader", "again", "every", "along", "thank", "hello", "answer", "grim",
       "trek", "wine", "bread", "dine", "mine", "line", "fine", "pine", "tine", "vine", "shine", "bella")
)


_RENDERER_MODULES = ("vocab", "encyclopedia", "stories", "dialogues", "lists", "arithmetic", "reviews",
                     "questions", "fields", "text")


@functools.lru_cache(maxsize=1)
def _template_words() -> tuple[str, ...]:
    """Every word inside a string literal of the renderer modules (docstrings and comments aside).

    Read from the source with ``ast`` so words in f-strings count too; sorted, so the result (and
    hence name generation) does not depend on set order.
    """
    words: set[str] = set()
    here = Path(__file__).parent
    for module in _RENDERER_MODULES:
        tree = ast.parse((here / f"{module}.py").read_text(encoding="utf-8"))
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                words.update(w.lower() for w in re.findall(r"[A-Za-z]+", node.value))
    return tuple(sorted(words))


def build_entities(rng: random.Random, counts: dict[str, int]) -> list[Entity]:
    names = NameMaker(rng, _RESERVED + _template_words())
    places = _places(rng, names, counts["place"])
    guilds = _guilds(rng, names, counts["guild"], places)
    creatures = _creatures(rng, names, counts["creature"])
    objects = _objects(rng, names, counts["object"], places)
    people = _people(rng, names, counts["person"], places, guilds, creatures, objects)
    _link(rng, people, places, guilds)
    return people + places + creatures + objects + guilds


def _places(rng: random.Random, names: NameMaker, n: int) -> list[Entity]:
    places = []
    for i in range(n):
        region = vocab.REGIONS[i % len(vocab.REGIONS)]
        x0, x1, y0, y1 = vocab.REGION_BOXES[region]
        pos = (rng.uniform(x0, x1), rng.uniform(y0, y1))
        population = int(math.exp(rng.uniform(math.log(150), math.log(30000))))
        attrs = {
            "region": region,
            "terrain": rng.choice(tuple(vocab.TERRAINS)),
            "population": population,
            "settlement": vocab.settlement_kind(population),
            "founded": rng.randint(300, 1150),
        }
        places.append(Entity("place", names.town_name(), attrs, pos))
    for p in places:  # nearest other place, ties broken by list order
        best = min((q for q in places if q is not p),
                   key=lambda q: math.hypot(q.pos[0] - p.pos[0], q.pos[1] - p.pos[1]))
        p.attrs["neighbor"] = best.name
        miles = math.hypot(best.pos[0] - p.pos[0], best.pos[1] - p.pos[1])
        p.attrs["neighbor_distance"] = max(1, round(miles))
    return places


def _guilds(rng: random.Random, names: NameMaker, n: int, places: list[Entity]) -> list[Entity]:
    guilds = []
    for trade in rng.sample(list(vocab.OCCUPATIONS), n):
        seat = rng.choice(places)
        attrs = {
            "trade": trade,
            "seat": seat.name,
            "founded": rng.randint(max(600, int(seat["founded"]) + 1), 1190),
        }
        guilds.append(Entity("guild", f"{names.brand_name()} Guild", attrs))
    return guilds


def _creatures(rng: random.Random, names: NameMaker, n: int) -> list[Entity]:
    classes = list(vocab.CREATURE_CLASSES)
    weights = [vocab.CREATURE_CLASSES[c]["weight"] for c in classes]
    out = []
    for _ in range(n):
        cls = rng.choices(classes, weights)[0]
        spec = vocab.CREATURE_CLASSES[cls]
        suffix = rng.choice(list(spec["suffixes"]))
        lo, hi = spec["lifespan"]
        attrs = {
            "class": cls,
            "size": rng.choice(spec["sizes"]),
            "habitat": rng.choice(spec["habitats"]),
            "diet": rng.choice(spec["diets"]),
            "colour": rng.choice(vocab.COLOURS),
            "legs": spec["suffixes"][suffix],
            "lifespan": rng.randint(lo, hi),
            "active": rng.choice(("day", "night")),
        }
        out.append(Entity("creature", names.creature_name(suffix), attrs))
    return out


def _objects(rng: random.Random, names: NameMaker, n: int, places: list[Entity]) -> list[Entity]:
    out = []
    categories = list(vocab.OBJECT_CATEGORIES)
    for _ in range(n):
        category = rng.choice(categories)
        _plural, materials, _purpose, (lo, hi) = vocab.OBJECT_CATEGORIES[category]
        attrs = {
            "category": category,
            "material": rng.choice(materials),
            "colour": rng.choice(vocab.COLOURS),
            "made_in": rng.choice(places).name,
            "price": rng.randint(lo, hi),
        }
        out.append(Entity("object", f"{names.brand_name()} {category}", attrs))
    return out


def _people(rng: random.Random, names: NameMaker, n: int, places: list[Entity], guilds: list[Entity],
            creatures: list[Entity], objects: list[Entity]) -> list[Entity]:
    guild_of = {g["trade"]: g.name for g in guilds}
    pets = [c for c in creatures if c["size"] != "large"] or creatures
    people: list[Entity] = []
    while len(people) < n:
        family = names.family_name()
        size = 2 if (n - len(people) >= 2 and rng.random() < 0.45) else 1
        birthplace = rng.choice(places).name
        first_year = rng.randint(1120, 1180)
        members = []
        for j in range(size):
            gender = rng.choice(vocab.GENDERS)
            first = names.first_name(gender)
            born = min(1184, first_year + (rng.randint(1, 12) if j else 0))
            home = birthplace if rng.random() < 0.6 else rng.choice(places).name
            occupation = rng.choice(list(vocab.OCCUPATIONS))
            attrs = {
                "first_name": first, "family_name": family, "gender": gender,
                "birth_year": born, "age": vocab.CURRENT_YEAR - born,
                "birthplace": birthplace, "home": home, "occupation": occupation,
            }
            if occupation in guild_of:
                attrs["guild"] = guild_of[occupation]
            if rng.random() < 0.35:
                attrs["pet"] = rng.choice(pets).name
            if rng.random() < 0.5:
                attrs["owns"] = rng.choice(objects).name
            members.append(Entity("person", f"{first} {family}", attrs))
        if size == 2:
            members[0].attrs["sibling"] = members[1].name
            members[1].attrs["sibling"] = members[0].name
        people.extend(members)
    return people


def _link(rng: random.Random, people: list[Entity], places: list[Entity], guilds: list[Entity]) -> None:
    """Relations that need the whole population: friends, mayors, guild leaders and sizes."""
    order = people[:]
    rng.shuffle(order)
    for a, b in zip(order[0::2], order[1::2]):
        if rng.random() < 0.75 and a.get("sibling") != b.name:
            a.attrs["friend"] = b.name
            b.attrs["friend"] = a.name
    for place in places:
        candidates = [p for p in people if p["home"] == place.name and int(p["age"]) >= 30]
        if candidates:
            mayor = rng.choice(candidates)
            place.attrs["mayor"] = mayor.name
            mayor.attrs["mayor_of"] = place.name
    for guild in guilds:
        members = [p for p in people if p.get("guild") == guild.name]
        guild.attrs["members"] = len(members)
        if members:
            leader = rng.choice(members)
            guild.attrs["leader"] = leader.name
            leader.attrs["leads"] = guild.name
