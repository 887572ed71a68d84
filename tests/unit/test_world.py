"""The built-in world: determinism, genres, held-out exclusion, and text that agrees with the facts."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.world import (
    CURRENT_YEAR,
    GENRES,
    KINDS,
    LABELS,
    World,
    ask,
    askable,
    generate_documents,
    generate_records,
    make_review,
    world_corpus_path,
    write_corpus,
)
from lmforge.data.world import corpus as corpus_mod


@pytest.fixture(scope="module")
def world() -> World:
    return World.build(seed=0)


@pytest.fixture(scope="module")
def sample(world: World) -> list[tuple[str, str]]:
    return list(generate_records(world, seed=0, target_bytes=400_000))


# -- the fact store -----------------------------------------------------------------------------


def test_build_is_deterministic_and_seeded() -> None:
    assert World.build(0, "small").facts == World.build(0, "small").facts
    assert World.build(0, "small").facts != World.build(1, "small").facts


def test_default_size_and_kinds(world: World) -> None:
    assert (len(world.people), len(world.places), len(world.creatures), len(world.objects)) == (300, 60, 40, 80)
    assert len(world.guilds) > 0
    assert {e.kind for e in world.entities} == set(KINDS)
    assert len({e.name for e in world.entities}) == len(world.entities)
    small, large = World.build(0, "small"), World.build(0, {"person": 500})
    assert len(small.people) == 120 and len(large.people) == 500


def test_bad_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        World.build(0, "huge")
    with pytest.raises(ConfigError):
        World.build(0, {"dragons": 3})


def test_query_get_and_facts(world: World) -> None:
    p = world.people[0]
    assert world.get(p.name) is p and world.get("Nobody Atall") is None
    home = world.value(p.name, "home")
    assert world.query(subject=p.name, relation="home") == [(p.name, "home", home)]
    assert (p.name, "home", home) in world.facts
    residents = world.query(relation="home", object=home)
    assert any(s == p.name for s, _, _ in residents)
    assert all(world[s]["home"] == home for s, _, _ in residents)
    # single-valued: at most one value per (subject, relation)
    keys = [(s, r) for s, r, _ in world.facts]
    assert len(keys) == len(set(keys))


def test_world_is_consistent(world: World) -> None:
    for p in world.people:
        assert p["age"] == CURRENT_YEAR - p["birth_year"]
        assert world[p["home"]].kind == "place" and world[p["birthplace"]].kind == "place"
        assert p.name == f"{p['first_name']} {p['family_name']}"
        if "sibling" in p.attrs:
            sib = world[p["sibling"]]
            assert sib["sibling"] == p.name and sib["family_name"] == p["family_name"]
        if "friend" in p.attrs:
            assert world[p["friend"]]["friend"] == p.name
        if "guild" in p.attrs:
            assert world[p["guild"]]["trade"] == p["occupation"]
        if "mayor_of" in p.attrs:
            assert world[p["mayor_of"]]["mayor"] == p.name and p["home"] == p["mayor_of"]
        if "pet" in p.attrs:
            assert world[p["pet"]].kind == "creature"
    for t in world.places:
        assert world.distance(t.name, t["neighbor"]) == t["neighbor_distance"]
        assert all(world.distance(t.name, o.name) >= t["neighbor_distance"] for o in world.places if o is not t)
    for g in world.guilds:
        members = world.referrers("guild", g.name)
        assert g["members"] == len(members)
        if "leader" in g.attrs:
            assert world[g["leader"]]["leads"] == g.name and world[g["leader"]]["guild"] == g.name
        assert g["founded"] > world[g["seat"]]["founded"]
    first_names = [p["first_name"] for p in world.people]
    assert len(first_names) == len(set(first_names))


def test_split_is_deterministic_disjoint_and_stratified(world: World) -> None:
    train, held = world.split(held_out_fraction=0.1, seed=3)
    assert (train, held) == world.split(held_out_fraction=0.1, seed=3)
    assert held != world.split(held_out_fraction=0.1, seed=4)[1]
    assert not set(train) & set(held) and len(train) + len(held) == len(world.entities)
    for kind in KINDS:
        n = len(world.of_kind(kind))
        assert sum(world[h].kind == kind for h in held) == round(0.1 * n)


def test_without_drops_entities_and_references(world: World) -> None:
    _, held = world.split(0.2, seed=0)
    view = world.without(held)
    gone = set(held)
    assert not any(e.name in gone for e in view.entities)
    for s, _r, o in view.facts:
        assert s not in gone and o not in gone
    assert set(view.facts) <= set(world.facts)  # a restriction never invents facts
    with pytest.raises(DataError):
        world.without(["Not A Name"])


# -- documents ------------------------------------------------------------------------------------


def test_documents_are_deterministic(world: World) -> None:
    a = list(generate_documents(world, seed=0, target_bytes=150_000))
    b = list(generate_documents(world, seed=0, target_bytes=150_000))
    c = list(generate_documents(world, seed=1, target_bytes=150_000))
    assert a == b and a != c
    assert sum(len(d) for d in a) >= 150_000
    assert list(generate_documents(world, seed=0, n_docs=25)) == a[:25]


def test_output_does_not_depend_on_hash_seed() -> None:
    """Set or dict-order dependence would show up as different bytes under another PYTHONHASHSEED."""
    code = ("import hashlib; from lmforge.data.world import World, generate_documents as g; "
            "print(hashlib.sha256(''.join(g(World.build(4, 'small'), 4, n_docs=300)).encode()).hexdigest())")
    digests = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.append(out.stdout.strip())
    assert digests[0] == digests[1]


def test_write_corpus_is_byte_identical_and_has_every_genre(tmp_path) -> None:
    p1 = write_corpus(tmp_path / "a.jsonl", seed=5, target_bytes=120_000, size="small")
    p2 = write_corpus(tmp_path / "b.jsonl", seed=5, target_bytes=120_000, size="small")
    assert p1.read_bytes() == p2.read_bytes()
    rows = [json.loads(line) for line in p1.read_text().splitlines()]
    assert all(set(r) == {"text", "genre"} and r["text"] for r in rows)
    assert {r["genre"] for r in rows} == set(GENRES)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left nothing behind


def test_world_corpus_path_caches(tmp_path, monkeypatch) -> None:
    calls = []
    real = corpus_mod.write_corpus
    monkeypatch.setattr(corpus_mod, "write_corpus", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = world_corpus_path(tmp_path, seed=2, target_bytes=50_000)
    again = world_corpus_path(tmp_path, seed=2, target_bytes=50_000)
    other = world_corpus_path(tmp_path, seed=3, target_bytes=50_000)
    assert first == again != other and len(calls) == 2
    assert str(corpus_mod.GENERATOR_VERSION) in first.name


def test_held_out_entities_never_appear(world: World) -> None:
    train, held = world.split(held_out_fraction=0.1, seed=0)
    text = "\n".join(generate_documents(world, seed=0, target_bytes=600_000, exclude=held))
    words = set(re.findall(r"[a-z]+", text.lower()))
    for name in held:
        e = world[name]
        assert e.name not in text, name
        assert e.key.lower() not in words, name  # first name / brand / place / creature name
    seen = sum(world[name].key.lower() in words for name in train)
    assert seen > 0.8 * len(train)  # and the rest of the world is there


def test_names_never_collide_with_template_words(world: World, sample) -> None:
    keys = {e.key.lower() for e in world.entities} | {str(p["family_name"]).lower() for p in world.people}
    creature_names = {e.name for e in world.creatures}
    words = {w for _, t in sample for w in re.findall(r"\b[a-z]+\b", t)} - creature_names
    assert not keys & words


# -- the text agrees with the fact store -----------------------------------------------------------

_NAME = r"([A-Z][a-z]+ [A-Z][a-z]+)"
_TOWN = r"([A-Z][a-z]+)"
_CLAIMS = [  # (regex, kind of the subject, relation); the regex captures (subject, value)
    (rf"{_NAME} lives in {_TOWN}\b", "person", "home"),
    (rf"{_NAME} was born in (\d+)\b", "person", "birth_year"),
    (rf"{_NAME} was born in {_TOWN}\b", "person", "birthplace"),
    (rf"{_NAME} is (\d+) years old", "person", "age"),
    (rf"{_NAME} works as an? ([a-z]+)", "person", "occupation"),
    (rf"{_NAME} (?:is a member of|belongs to) the ([A-Z][a-z]+ Guild)", "person", "guild"),
    (rf"{_NAME}'s best friend is {_NAME}", "person", "friend"),
    (rf"{_TOWN} has a population of (\d+)", "place", "population"),
    (rf"(\d+) people live in {_TOWN}", "place", "population"),
    (rf"\b{_TOWN} was founded in (\d+)", "place", "founded"),
    (r"([A-Z][a-z]+ Guild) was founded in (\d+)", "guild", "founded"),
    (rf"[Tt]he mayor of {_TOWN} is {_NAME}", "place", "mayor"),
    (rf"{_NAME} is the mayor of {_TOWN}", "person", "mayor_of"),
    (r"[Tt]he ([A-Z][a-z]+ [a-z]+) is made (?:of|from) ([a-z]+)", "object", "material"),
    (r"[Tt]he ([A-Z][a-z]+ [a-z]+) costs (\d+) coins", "object", "price"),
    (rf"[Tt]he ([A-Z][a-z]+ [a-z]+) is made in {_TOWN}", "object", "made_in"),
    (r"[Tt]he ([a-z]+) (?:eats|feeds on) (?:mostly )?([a-z ]+)\.", "creature", "diet"),
    (r"[Tt]he ([a-z]+) has (\d+) legs", "creature", "legs"),
    (r"[Tt]he ([a-z]+) (?:lives|is found) in ([a-z]+)\.", "creature", "habitat"),
    (r"[Tt]he ([a-z]+) is an? [a-z-]+ [a-z]+ (?:that lives|found) in ([a-z]+)\.", "creature", "habitat"),
]


def test_stated_facts_agree_with_the_store(world: World, sample) -> None:
    text = "\n".join(t for _, t in sample)
    checked = 0
    for pattern, kind, relation in _CLAIMS:
        hits = 0
        for m in re.finditer(pattern, text):
            subject, value = m.group(1), m.group(2)
            if relation == "population" and pattern.startswith("(\\d"):
                subject, value = value, subject
            entity = world.get(subject)
            if entity is None or entity.kind != kind:
                continue  # e.g. "Alva's best friend" or a pronoun caught by a loose regex
            assert str(entity.get(relation)) == value, (m.group(0), entity.get(relation))
            hits += 1
        assert hits > 0, f"no sentence matched {pattern!r}; did a template change?"
        checked += hits
    print(f"checked {checked} stated facts")
    assert checked > 300


def test_arithmetic_is_correct(sample) -> None:
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    n = 0
    for _genre, text in sample:
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", text):
            assert ops[op](int(a), int(b)) == int(c), f"{a} {op} {b} = {c}"
            n += 1
        for a, word, b, c in re.findall(r"(\d+) (plus|minus|times|divided by) (\d+) equals (\d+)", text):
            op = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}[word]
            assert ops[op](int(a), int(b)) == int(c)
    assert n > 200


def test_stories_and_dialogues_state_true_travel_and_prices(world: World, sample) -> None:
    text = "\n".join(t for g, t in sample if g in ("story", "dialogue"))
    trips = re.findall(r"It is (\d+) miles from ([A-Z][a-z]+) to ([A-Z][a-z]+)", text)
    assert trips
    for d, a, b in trips:
        assert world.distance(a, b) == int(d)
    for name, price in re.findall(r"bought an? ([A-Z][a-z]+ [a-z]+) for (\d+) coins", text):
        assert world[name]["price"] == int(price)


def test_questions_have_true_answers(world: World) -> None:
    rng = random.Random(0)
    for e in world.entities[::7]:
        for rel in askable(e):
            qa = ask(world, e, rel, rng, pronoun=rng.random() < 0.3)
            assert qa.short == str(e[rel]) and qa.question.endswith("?")
            assert qa.short in qa.answer or (rel, qa.short) == ("legs", "0") and "no legs" in qa.answer


def test_reviews_carry_their_label(world: World) -> None:
    rng = random.Random(0)
    reviews = [make_review(world, rng) for _ in range(300)]
    assert {r.label for r in reviews} == set(LABELS)
    assert 0.35 < sum(r.label == "positive" for r in reviews) / len(reviews) < 0.65
    for label in LABELS:
        r = make_review(world, rng, label=label, with_rating=True)
        stars = int(re.search(r"Rating: (\d) out of 5", r.text).group(1))
        assert r.label == label and (stars >= 4) == (label == "positive")
    # negation and contrast both occur, so the label cannot be read off a single word
    text = " ".join(r.text for r in reviews)
    assert "not bad at all" in text and ", but " in text
    for r in reviews:  # an object review signed by a person is by someone who owns one
        subject = world[r.subject]
        if r.author and subject.kind == "object":
            assert world[r.author]["owns"] == r.subject
