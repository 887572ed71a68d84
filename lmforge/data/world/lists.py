"""Lists and small tables grouped by a shared fact ("Towns of the northern region: ...").

Lists teach the same facts from the other direction (region -> towns rather than town -> region)
and in a different layout (comma lists, bullets, numbered rankings, pipe tables).  Headings say
"some"/"include" where a list is a sample, so no list claims completeness it does not have.
"""

from __future__ import annotations

import random

from . import vocab
from .entity import Entity
from .facts import World
from .text import cap, join

_MAX_ITEMS = 8


def _sample(items: list[Entity], rng: random.Random, k: int = _MAX_ITEMS) -> list[Entity]:
    """Up to ``k`` items, kept in world order so the list reads stably."""
    if len(items) <= k:
        return items
    idx = sorted(rng.sample(range(len(items)), k))
    return [items[i] for i in idx]


def _layout(heading: str, rows: list[str], rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        return f"{heading}: {join(rows)}."
    if r < 0.7:
        return heading + ":\n" + "\n".join(f"- {row}" for row in rows)
    return heading + ":\n" + "\n".join(f"{i}. {row}" for i, row in enumerate(rows, 1))


def _towns_by_region(world: World, rng: random.Random) -> str | None:
    region = rng.choice(vocab.REGIONS)
    towns = _sample([p for p in world.places if p["region"] == region], rng)
    if not towns:
        return None
    heading = rng.choice(("Places of the {r} region", "Some towns and villages in the {r} region",
                          "Settlements in the {r} region include")).format(r=region)
    if rng.random() < 0.5:
        rows = [f"{t.name} ({t['settlement']}, population {t['population']})" for t in towns]
    else:
        rows = [t.name for t in towns]
    return _layout(heading, rows, rng)


def _residents(world: World, rng: random.Random) -> str | None:
    town = rng.choice(world.places)
    people = _sample(world.referrers("home", town.name), rng)
    if not people:
        return None
    heading = rng.choice(("Some people who live in {t}", "Residents of {t} include", "People of {t}")).format(t=town.name)
    rows = [f"{p.name}, {p['occupation']}" if rng.random() < 0.7 else f"{p.name}, age {p['age']}" for p in people]
    return _layout(heading, rows, rng)


def _guild_members(world: World, rng: random.Random) -> str | None:
    if not world.guilds:
        return None
    guild = rng.choice(world.guilds)
    people = _sample(world.referrers("guild", guild.name), rng)
    if not people:
        return None
    heading = f"Some members of the {guild.name}"
    rows = [f"{p.name} of {p['home']}" if "home" in p.attrs else p.name for p in people]
    return _layout(heading, rows, rng)


def _creatures_by(world: World, rng: random.Random) -> str | None:
    if not world.creatures:
        return None
    rel = rng.choice(("diet", "habitat", "class"))
    value = rng.choice(world.creatures)[rel]
    found = _sample([c for c in world.creatures if c[rel] == value], rng)
    heading = {"diet": f"Creatures that eat {value}", "habitat": f"Creatures that live in {value}",
               "class": f"Some {value}s of the land" if value != "fish" else "Some fish of the land"}[rel]
    rows = [f"the {c.name}" if rel != "class" else f"the {c.name} ({c['size']})" for c in found]
    return _layout(heading, rows, rng)


def _goods(world: World, rng: random.Random) -> str | None:
    if not world.objects:
        return None
    if rng.random() < 0.5:
        town = rng.choice(world.places)
        items = _sample(world.referrers("made_in", town.name), rng)
        heading = rng.choice(("Goods made in {t}", "Prices at the market in {t}")).format(t=town.name)
    else:
        material = rng.choice(world.objects)["material"]
        items = _sample([o for o in world.objects if o["material"] == material], rng)
        heading = f"Things made of {material}"
    if not items:
        return None
    rows = [f"the {o.name}: {o['price']} coins" for o in items]
    return _layout(heading, rows, rng)


def _ranking(world: World, rng: random.Random) -> str | None:
    """A sample of places or creatures ordered by a number (only ordering claims, no "largest")."""
    if rng.random() < 0.5 or not world.creatures:
        items = _sample(world.places, rng, rng.randint(3, 6))
        key, word = rng.choice((("population", "population"), ("founded", "year founded")))
        items = sorted(items, key=lambda e: (int(e[key]), e.name))
        heading = f"Some places, ordered by {word}"
        rows = [f"{e.name} ({e[key]})" for e in items]
    else:
        items = _sample(world.creatures, rng, rng.randint(3, 6))
        items = sorted(items, key=lambda e: (int(e["lifespan"]), e.name))
        heading = "Some creatures, ordered by how long they live"
        rows = [f"the {e.name} ({e['lifespan']} years)" for e in items]
    return _layout(heading, rows, rng)


def _table(world: World, rng: random.Random) -> str | None:
    """A pipe table of a few entities of one kind."""
    if rng.random() < 0.5:
        items = _sample(world.people, rng, rng.randint(3, 6))
        cols = ("name", "home", "occupation", "age")
        rows = [[p.name, str(p.get("home", "unknown")), str(p["occupation"]), str(p["age"])] for p in items]
    elif rng.random() < 0.5 and world.objects:
        items = _sample(world.objects, rng, rng.randint(3, 6))
        cols = ("item", "material", "colour", "price")
        rows = [[o.name, str(o["material"]), str(o["colour"]), f"{o['price']} coins"] for o in items]
    elif world.creatures:
        items = _sample(world.creatures, rng, rng.randint(3, 6))
        cols = ("creature", "eats", "legs", "lives in")
        rows = [[c.name, str(c["diet"]), str(c["legs"]), str(c["habitat"])] for c in items]
    else:
        return None
    lines = [" | ".join(cap(c) for c in cols)] + [" | ".join(r) for r in rows]
    return "\n".join(lines)


_MAKERS = (_towns_by_region, _residents, _guild_members, _creatures_by, _goods, _ranking, _table)


def render_list(world: World, rng: random.Random) -> str:
    for _ in range(20):
        text = rng.choice(_MAKERS)(world, rng)
        if text:
            return text
    return _table(world, rng) or "Regions of the land: " + join(list(vocab.REGIONS)) + "."

