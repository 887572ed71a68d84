"""Arithmetic: drills ("17 + 25 = 42") and word problems, many built on world facts.

Every equation is written as ``a op b = c`` with a single binary operator and a correct, non-negative
whole result (division only when exact), so a checker can verify all of them with one regex and a
model can learn the operations rather than noise.  Word problems reuse real prices, ages, founding
years, distances and leg counts, tying numbers in the world to arithmetic over them.
"""

from __future__ import annotations

import random

from . import vocab
from .facts import World
from .text import a, cap, number_word, plural_creature, plural_object

_OPS = ("+", "-", "*", "/")


def equation(rng: random.Random, op: str | None = None) -> tuple[int, str, int, int]:
    """(a, op, b, result) with a correct whole result."""
    op = op or rng.choice(_OPS)
    if op == "+":
        x, y = rng.randint(0, 99), rng.randint(0, 99)
        return x, op, y, x + y
    if op == "-":
        x, y = rng.randint(0, 99), rng.randint(0, 99)
        x, y = max(x, y), min(x, y)
        return x, op, y, x - y
    if op == "*":
        x, y = rng.randint(0, 12), rng.randint(0, 12)
        return x, op, y, x * y
    y, q = rng.randint(1, 12), rng.randint(0, 12)
    return y * q, op, y, q


def fmt(x: int, op: str, y: int, r: int) -> str:
    return f"{x} {op} {y} = {r}"


_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


def _drill(world: World, rng: random.Random) -> str:
    op = rng.choice(_OPS + (None,))
    heading = rng.choice(("Sums", "Practice", "Arithmetic practice", "Exercises", ""))
    lines = [fmt(*equation(rng, op)) for _ in range(rng.randint(4, 10))]
    return (heading + ":\n" if heading else "") + "\n".join(lines)


def _spoken(world: World, rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 5)):
        x, op, y, r = equation(rng)
        t = rng.random()
        if t < 0.4:
            out.append(f"What is {x} {_WORDS[op]} {y}? The answer is {r}.")
        elif t < 0.7:
            out.append(f"{x} {_WORDS[op]} {y} equals {r}.")
        else:
            out.append(f"Q: What is {x} {op} {y}?\nA: {fmt(x, op, y, r)}")
    return "\n".join(out)


def _shopping(world: World, rng: random.Random) -> str | None:
    if not world.objects or not world.people:
        return None
    o, p = rng.choice(world.objects), rng.choice(world.people)
    n, price = rng.randint(2, 9), int(o["price"])
    first, he = p["first_name"], "she" if p["gender"] == "female" else "he"
    total = n * price
    q = (f"{cap(a(o.name))} costs {price} coins. {first} wants to buy {number_word(n)} of them. "
         f"How many coins does {he} need?")
    ans = f"{fmt(n, '*', price, total)}. {cap(he)} needs {total} coins."
    if rng.random() < 0.5:
        paid = (total // 10 + 1) * 10
        q += f" If {he} pays with {paid} coins, how much change does {he} get back?"
        ans += f" {fmt(paid, '-', total, paid - total)}. {cap(he)} gets {paid - total} coins back."
    return f"{q}\n{ans}"


def _ages(world: World, rng: random.Random) -> str | None:
    if len(world.people) < 2:
        return None
    p, q = rng.sample(world.people, 2)
    if rng.random() < 0.5:
        k = rng.randint(1, 20)
        return (f"{p.name} is {p['age']} years old. How old will {p['first_name']} be in {k} years?\n"
                f"{fmt(int(p['age']), '+', k, int(p['age']) + k)}. {p['first_name']} will be {int(p['age']) + k}.")
    old, young = (p, q) if int(p["age"]) >= int(q["age"]) else (q, p)
    diff = int(old["age"]) - int(young["age"])
    return (f"{old.name} is {old['age']} and {young.name} is {young['age']}. "
            f"How many years older is {old['first_name']}?\n"
            f"{fmt(int(old['age']), '-', int(young['age']), diff)}. {old['first_name']} is {diff} years older.")


def _founding(world: World, rng: random.Random) -> str | None:
    if len(world.places) < 2:
        return None
    p, q = rng.sample(world.places, 2)
    if rng.random() < 0.5:
        founded = int(p["founded"])
        age = vocab.CURRENT_YEAR - founded
        return (f"{p.name} was founded in {founded}. The year is now {vocab.CURRENT_YEAR}. How old is {p.name}?\n"
                f"{fmt(vocab.CURRENT_YEAR, '-', founded, age)}. {p.name} is {age} years old.")
    old, new = (p, q) if int(p["founded"]) <= int(q["founded"]) else (q, p)
    gap = int(new["founded"]) - int(old["founded"])
    return (f"{old.name} was founded in {old['founded']} and {new.name} in {new['founded']}. "
            f"How many years apart were they founded?\n"
            f"{fmt(int(new['founded']), '-', int(old['founded']), gap)}. They were founded {gap} years apart.")


def _distance(world: World, rng: random.Random) -> str | None:
    towns = [p for p in world.places if "neighbor" in p.attrs]
    if not towns:
        return None
    t = rng.choice(towns)
    d = int(t["neighbor_distance"])
    return (f"It is {d} miles from {t.name} to {t['neighbor']}. A carter goes there and back. "
            f"How far does the carter travel?\n{fmt(d, '*', 2, 2 * d)}. The carter travels {2 * d} miles.")


def _legs(world: World, rng: random.Random) -> str | None:
    beasts = [c for c in world.creatures if int(c["legs"]) > 0]
    if not beasts:
        return None
    c = rng.choice(beasts)
    n, legs = rng.randint(2, 9), int(c["legs"])
    return (f"{cap(a(c.name))} has {legs} legs. How many legs do {n} {plural_creature(c.name)} have?\n"
            f"{fmt(n, '*', legs, n * legs)}. They have {n * legs} legs.")


def _sharing(world: World, rng: random.Random) -> str | None:
    if len(world.people) < 2:
        return None
    p, q = rng.sample(world.people, 2)
    item = rng.choice(vocab.FRUITS)
    x = rng.randint(5, 60)
    if rng.random() < 0.5:
        y = rng.randint(1, x)
        return (f"{p['first_name']} had {x} {item} and gave {y} to {q['first_name']}. "
                f"How many {item} does {p['first_name']} have left?\n{fmt(x, '-', y, x - y)}.")
    k = rng.randint(2, 6)
    total = k * rng.randint(1, 12)
    return (f"{p['first_name']} shares {total} {item} equally among {k} friends. How many does each friend get?\n"
            f"{fmt(total, '/', k, total // k)}. Each friend gets {total // k}.")


def _stock(world: World, rng: random.Random) -> str | None:
    towns = [t for t in world.places if world.referrers("made_in", t.name)]
    if not towns:
        return None
    t = rng.choice(towns)
    o = rng.choice(world.referrers("made_in", t.name))
    x, y = rng.randint(10, 90), rng.randint(1, 9)
    return (f"A workshop in {t.name} made {x} {plural_object(o)} on Monday and {y} more on Tuesday. "
            f"How many did it make?\n{fmt(x, '+', y, x + y)}. It made {x + y} {plural_object(o)}.")


_PROBLEMS = (_shopping, _ages, _founding, _distance, _legs, _sharing, _stock)


def render_arithmetic(world: World, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return _drill(world, rng)
    if r < 0.45:
        return _spoken(world, rng)
    parts = []
    for _ in range(rng.randint(1, 3)):
        text = rng.choice(_PROBLEMS)(world, rng)
        if text:
            parts.append(text)
    return "\n\n".join(parts) if parts else _drill(world, rng)
