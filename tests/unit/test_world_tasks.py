"""World fine-tuning tasks: exact sizes, determinism, honest held-out splits and task baselines."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.world import WORLD_TASKS, World, build_world_task, world_task
from lmforge.data.world.questions import _QA
from lmforge.data.world.tasks import bio_tags
from lmforge.data.world.text import plural_creature, plural_object
from lmforge.eval.baselines import task_baselines

ENTITY_SPLIT_TASKS = ("world-sentiment", "world-sentiment-mixed", "world-topic", "world-ner", "world-qa-context")


@pytest.fixture(scope="module")
def world() -> World:
    return World.build(0, "default")


@pytest.fixture(scope="module")
def built() -> dict[str, dict[str, list[dict]]]:
    return {name: build_world_task(name) for name in WORLD_TASKS}


def _text(record: dict) -> str:
    return record.get("text") or record.get("input") or " ".join(record["tokens"])


def _digest(tasks: dict) -> str:
    return hashlib.sha256(json.dumps(tasks, sort_keys=True).encode()).hexdigest()


# -- registry and sizes ---------------------------------------------------------------------------


def test_registry() -> None:
    assert set(WORLD_TASKS) == {"world-sentiment", "world-sentiment-mixed", "world-topic", "world-ner",
                                "world-qa-context", "world-qa-closed"}
    assert world_task("world-sentiment").labels == ("negative", "positive")
    assert world_task("world-topic").labels == ("creature", "guild", "object", "person", "place")
    assert world_task("world-ner").labels[0] == "O" and len(world_task("world-ner").labels) == 11
    assert world_task("world-qa-closed").closed_book is True and world_task("world-qa-context").closed_book is False
    for task in WORLD_TASKS.values():
        assert (task.labels is None) == (task.type == "text2text") and task.held_out
    with pytest.raises(ConfigError, match="did you mean 'world-ner'"):
        world_task("world-nre")


def test_sizes_are_exact_and_fast(built: dict) -> None:
    for name, splits in built.items():
        assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "validation": 300, "test": 500}, name
        start = time.perf_counter()
        small = build_world_task(name, seed=3, n_train=37, n_val=0, n_test=11)
        assert time.perf_counter() - start < 2.0
        assert [len(small[s]) for s in ("train", "validation", "test")] == [37, 0, 11]


def test_bad_sizes_are_user_errors() -> None:
    with pytest.raises(ConfigError, match="n_train must be an integer >= 0, got -1"):
        build_world_task("world-topic", n_train=-1)
    with pytest.raises(DataError, match="fewer"):
        build_world_task("world-qa-closed", n_test=5000)


def test_deterministic_across_processes_and_seeded(built: dict) -> None:
    small = {name: build_world_task(name, seed=1, n_train=50, n_val=10, n_test=20) for name in WORLD_TASKS}
    assert small == {name: build_world_task(name, seed=1, n_train=50, n_val=10, n_test=20) for name in WORLD_TASKS}
    for name in WORLD_TASKS:
        assert build_world_task(name, seed=2, n_train=50, n_val=10, n_test=20) != small[name], name
    code = ("import hashlib, json; from lmforge.data.world import WORLD_TASKS, build_world_task; "
            "t = {n: build_world_task(n, seed=1, n_train=50, n_val=10, n_test=20) for n in WORLD_TASKS}; "
            "print(hashlib.sha256(json.dumps(t, sort_keys=True).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(small)


# -- honest splits ----------------------------------------------------------------------------------


def test_entity_splits_name_disjoint_entities(built: dict, world: World) -> None:
    """Every way the text can name an entity, mapped back to it: no entity named in a test or
    validation record is named in any train record (and vice versa)."""
    forms: dict[str, str] = {}
    for e in world.entities:
        names = [e.name] + ([str(e["first_name"])] if e.kind == "person" else [])
        names += [plural_creature(e.name)] if e.kind == "creature" else []
        names += [plural_object(e)] if e.kind == "object" else []
        forms.update({n.lower(): e.name for n in names})
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, forms), key=len, reverse=True)) + r")\b", re.I)
    for name in ENTITY_SPLIT_TASKS:
        named = {s: {forms[m.lower()] for r in rs for m in pattern.findall(_text(r))} for s, rs in built[name].items()}
        assert len(named["test"]) >= 10 and len(named["validation"]) >= 5, name
        assert not named["train"] & named["test"], (name, sorted(named["train"] & named["test"])[:5])
        assert not named["train"] & named["validation"] and not named["validation"] & named["test"], name


def _closed_pair(question: str, target: str, world: World) -> tuple[str, str]:
    """Recover the (entity, relation) a closed-book question asks about from questions.py's templates."""
    found = set()
    for rel, pairs in _QA.items():
        for q, _ in pairs:
            rx = re.escape(q).replace(r"\{name\}", "(.+)").replace(r"\{poss\}", "(.+)'s")
            m = re.fullmatch(rx.replace(r"\{rel\}", "(?:sister|brother)"), question)
            if m:
                subject = m.group(1)
                e = world.get(subject) or world.get(subject.removeprefix("the "))
                if e is not None and str(e.get(rel)) == target:
                    found.add((e.name, rel))
    assert len(found) == 1, (question, target, found)
    return found.pop()


def test_closed_book_questions_are_split_by_entity_and_relation(built: dict, world: World) -> None:
    splits = built["world-qa-closed"]
    pairs = {s: [_closed_pair(r["input"].removeprefix("question: "), r["target"], world) for r in rs]
             for s, rs in splits.items()}
    assert len(set(pairs["test"])) == 500 and len(set(pairs["validation"])) == 300
    assert not set(pairs["train"]) & set(pairs["test"]) and not set(pairs["train"]) & set(pairs["validation"])
    assert not set(pairs["validation"]) & set(pairs["test"])
    assert all(" context:" not in r["input"] for r in splits["test"])


# -- per task ---------------------------------------------------------------------------------------


def test_sentiment_needs_more_than_keywords(built: dict) -> None:
    splits = built["world-sentiment"]
    for s, rs in splits.items():
        counts = Counter(r["label"] for r in rs)
        assert counts["positive"] == counts["negative"] == len(rs) // 2, s
    texts = " ".join(r["text"] for r in splits["train"])
    assert "Rating" not in texts and "recommend" not in texts  # no verdict/rating giveaways
    # "not" and "but" are as common under either label (each within 15% of the other)
    for word in ("not", "but"):
        pos, neg = (sum(r["text"].split().count(word) for r in splits["train"] if r["label"] == lab)
                    for lab in ("positive", "negative"))
        assert abs(pos - neg) < 0.15 * max(pos, neg), word
    base = task_baselines("classification", splits)
    print(f"\nworld-sentiment baselines: {base}")
    assert base["majority"]["accuracy"] == pytest.approx(0.5)
    assert base["bag_of_words"]["accuracy"] <= 0.85


def test_topic_is_short_balanced_and_reports_bow(built: dict) -> None:
    splits = built["world-topic"]
    assert Counter(r["label"] for r in splits["test"]) == {k: 100 for k in WORLD_TASKS["world-topic"].labels}
    assert max(len(r["text"].split()) for rs in splits.values() for r in rs) < 80
    assert all("\n" not in r["text"] for r in splits["train"])
    base = task_baselines("classification", splits)
    print(f"\nworld-topic baselines (bag of words may be high; not a target): {base}")


def test_ner_tags_are_aligned_and_well_formed(built: dict) -> None:
    labels = set(WORLD_TASKS["world-ner"].labels)
    for rs in built["world-ner"].values():
        for r in rs:
            assert len(r["tokens"]) == len(r["tags"]) and set(r["tags"]) <= labels
            assert any(t != "O" for t in r["tags"])
            for prev, tag in zip(["O"] + r["tags"], r["tags"]):
                assert not tag.startswith("I-") or prev[2:] == tag[2:], r
    print(f"\nworld-ner baselines: {task_baselines('token_classification', built['world-ner'])}")


def test_bio_tags_match_names_with_attached_punctuation(world: World) -> None:
    person, place, guild = world.people[0], world.places[0], world.guilds[0]
    first, last = person.name.split()
    tokens = f"{first}'s friend moved to {place.name}, near the {guild.name} hall of {person.name}.".split()
    assert bio_tags(tokens) == ["B-PER", "O", "O", "O", "B-LOC", "O", "O", "B-ORG", "I-ORG", "O", "O",
                                "B-PER", "I-PER"]
    obj, creature = world.objects[0], world.creatures[0]
    tokens = f"the {last} family sells {plural_object(obj)} and keeps {plural_creature(creature.name)}.".split()
    assert bio_tags(tokens) == ["O", "O", "O", "O", "B-OBJ", "I-OBJ", "O", "O", "B-CRE"]


def test_qa_context_answers_occur_in_the_passage(built: dict) -> None:
    for rs in built["world-qa-context"].values():
        for r in rs:
            question, _, passage = r["input"].partition(" context: ")
            assert question.startswith("question: ") and passage
            assert re.search(rf"(?<!\w){re.escape(r['target'])}(?!\w)", passage), r
            assert 1 <= len(r["target"].split()) <= 4 and len(passage.split()) <= 80
    base = task_baselines("text2text", built["world-qa-context"])
    print(f"\nworld-qa-context baselines: {base}\nworld-qa-closed baselines: "
          f"{task_baselines('text2text', built['world-qa-closed'])}")
    assert base["majority_answer"]["exact_match"] < 0.1


def test_qa_context_counterfactual_swaps_train_answers_only(built: dict) -> None:
    """counterfactual=1: (nearly) every train answer is replaced, in the passage and the target, by another train
    value; validation and test are untouched, and the swapped answer is still read off the passage."""
    plain = built["world-qa-context"]
    cf = build_world_task("world-qa-context", counterfactual=1.0)
    assert cf["test"] == plain["test"] and cf["validation"] == plain["validation"]
    swapped = [(a, b) for a, b in zip(plain["train"], cf["train"]) if a != b]
    assert len(swapped) > 0.9 * len(plain["train"])
    for a, b in swapped:
        assert b["target"] != a["target"] and b["input"].split(" context: ")[0] == a["input"].split(" context: ")[0]
        passage = b["input"].partition(" context: ")[2]
        assert re.search(rf"(?<!\w){re.escape(b['target'])}(?!\w)", passage)
        assert not re.search(rf"(?<!\w){re.escape(a['target'])}(?!\w)", passage)
    half = build_world_task("world-qa-context", counterfactual=0.5)
    assert 0.35 < sum(a != b for a, b in zip(plain["train"], half["train"])) / len(plain["train"]) < 0.65
    with pytest.raises(ConfigError, match="counterfactual applies to world-qa-context only"):
        build_world_task("world-topic", counterfactual=0.5)
    with pytest.raises(ConfigError, match=r"counterfactual must be in \[0, 1\]"):
        build_world_task("world-qa-context", counterfactual=1.5)
