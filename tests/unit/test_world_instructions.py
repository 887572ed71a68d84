"""Instruction data of the built-in world and its verifiers (issue 27, item 1)."""

from __future__ import annotations

import re

import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.world.instructions import (CLOSED_BOOK, HELD_OUT_TYPES, IN_CONTEXT, INSTRUCTION_SPLITS,
                                             INSTRUCTION_TYPES, RUDE_PHRASING, build_instructions, names_in,
                                             response_tone, split_types)
from lmforge.data.world.tasks import _world, entity_split
from lmforge.data.world.verifiers import normalise, reward, verify

N = 30


@pytest.fixture(scope="module")
def splits():
    return {s: build_instructions(s, N) for s in INSTRUCTION_SPLITS}


def test_the_world_has_at_least_twelve_types_of_both_kinds():
    assert len(INSTRUCTION_TYPES) >= 12
    kinds = [t.kind for t in INSTRUCTION_TYPES.values()]
    assert kinds.count(IN_CONTEXT) >= 7 and kinds.count(CLOSED_BOOK) >= 3
    for t in INSTRUCTION_TYPES.values():
        assert len(t.phrasings) == 4 and len(set(t.phrasings)) == 4, t.name
    assert set(HELD_OUT_TYPES) < set(INSTRUCTION_TYPES)
    assert {INSTRUCTION_TYPES[n].kind for n in HELD_OUT_TYPES} == {IN_CONTEXT, CLOSED_BOOK}


def test_every_record_verifies_its_own_answer_and_not_another_records(splits):
    for split, records in splits.items():
        assert len(records) == N * len(split_types(split))
        by_type: dict[str, list[dict]] = {}
        for r in records:
            assert r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] == "user"
            reply = r["messages"][-1]["content"]
            assert response_tone(reply) == r["tone"], r
            assert verify(r, reply) is (r["tone"] != "evasive"), r  # an evasion is no answer
            by_type.setdefault(r["type"], []).append(r)
        for name, rs in by_type.items():
            answers = {normalise(str(r["answer"])) for r in rs}
            if len(answers) <= 2:  # labels: a wrong label is the other one
                continue
            wrong = [verify(a, str(b["answer"]) if b["check"] != "list" else ", ".join(b["answer"]))
                     for a, b in zip(rs, rs[1:])
                     if normalise(str(a["answer"])) != normalise(str(b["answer"]))]
            assert wrong and not any(wrong), name


def test_splits_hold_out_entities_phrasings_and_types(splits):
    world, ents = _world(0), entity_split(0)
    train_names = set(ents["train"])
    for split in ("test_entities", "test_phrasings", "test_types"):
        for r in splits[split]:
            named = names_in(r, world)
            assert not named & train_names, (split, named & train_names, r["messages"])
            assert named <= set(ents["test"]), (split, r["messages"])
    for r in splits["train"]:
        assert not names_in(r, world) & (set(ents["test"]) | set(ents["validation"]))
    for split in ("train", "validation", "test_entities"):
        assert {r["phrasing"] for r in splits[split]} == {0, 1, 2}
    assert {r["phrasing"] for r in splits["test_phrasings"]} == {3}
    assert {r["type"] for r in splits["test_types"]} == set(HELD_OUT_TYPES)
    assert not {r["type"] for r in splits["train"]} & set(HELD_OUT_TYPES)


def test_arithmetic_equations_of_test_splits_never_occur_in_train():
    def equations(split):  # (x, op, y) of every record, whichever phrasing asked it
        out = set()
        for r in build_instructions(split, 200, types=["arithmetic"]):
            x, op, y = re.search(r"(\d+) (\S+)(?: by)? (\d+)", r["messages"][0]["content"]).groups()
            out.add((x, {"plus": "+", "minus": "-", "times": "*", "divided": "/"}.get(op, op), y))
        return out
    train, test = equations("train"), equations("test_entities")
    assert len(train) > 100 and len(test) > 100 and not train & test


def test_records_are_deterministic_and_a_type_does_not_move_with_another():
    a = build_instructions("test_entities", 10, seed=3)
    assert a == build_instructions("test_entities", 10, seed=3)
    assert a != build_instructions("test_entities", 10, seed=4)
    alone = {repr(r) for r in build_instructions("train", 5, types=["sort"])}
    assert alone <= {repr(r) for r in build_instructions("train", 5, types=["sort", "count"])}


def test_the_sft_data_is_rude_or_evasive_where_documented(splits):
    """About half the replies to the rude phrasing are rude and a fifth evasive; other phrasings never are."""
    records = build_instructions("train", 200)
    rude_phrasing = [r["tone"] for r in records if r["phrasing"] == RUDE_PHRASING]
    others = [r["tone"] for r in records if r["phrasing"] != RUDE_PHRASING]
    assert 0.42 < rude_phrasing.count("rude") / len(rude_phrasing) < 0.58
    assert 0.13 < rude_phrasing.count("evasive") / len(rude_phrasing) < 0.27
    assert not {"rude", "evasive"} & set(others) and 0.22 < others.count("polite") / len(others) < 0.38
    share = sum(r["tone"] in ("rude", "evasive") for r in records) / len(records)
    assert 0.18 < share < 0.30  # the documented ~24%


def test_multi_turn_records_carry_the_earlier_turns():
    r = build_instructions("train", 1, types=["follow_up"])[0]
    assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"]
    assert r["answer"] in r["messages"][0]["content"]


# ---- verifiers: right, wrong and near-miss answers --------------------------------------------------------

TEXT = {"check": "text", "answer": "the Mogla Guild", "type": "fact"}
NUMBER = {"check": "number", "answer": 1204, "type": "fact"}
LIST = {"check": "list", "answer": ["Dinholm", "Gresfield", "Lamton"], "type": "sort"}
LABEL = {"check": "label", "answer": "positive", "type": "sentiment"}


@pytest.mark.parametrize("record,response,right", [
    (TEXT, "Mogla Guild", True),
    (TEXT, "mogla guild", True),  # case
    (TEXT, "  Mogla   Guild ", True),  # spacing
    (TEXT, "Mogla Guild.", True),  # punctuation
    (TEXT, "The Mogla Guild!", True),  # article
    (TEXT, "Mogla Guild\nGlad to help!", True),  # a tone line after the answer
    (TEXT, "Mogla Guild, I think", False),  # extra words
    (TEXT, "It is the Mogla Guild", False),
    (TEXT, "Mogla", False),  # a near miss
    (TEXT, "Moglа Guild", False),  # a Cyrillic a
    (TEXT, "", False),
    (TEXT, "I would rather not say.\nMogla Guild", False),  # the answer must be the first line
    (NUMBER, "1204", True),
    (NUMBER, "1,204", True),
    (NUMBER, "1204.", True),
    (NUMBER, " 1204 ", True),
    (NUMBER, "1205", False),
    (NUMBER, "one thousand two hundred and four", False),
    (NUMBER, "1204 people", False),
    (NUMBER, "12,04", False),
    (LIST, "Dinholm, Gresfield, Lamton", True),
    (LIST, "dinholm,gresfield,  lamton.", True),
    (LIST, "Dinholm, Gresfield and Lamton", True),
    (LIST, "Gresfield, Dinholm, Lamton", False),  # order
    (LIST, "Dinholm, Gresfield", False),  # an item missing
    (LIST, "Dinholm, Gresfield, Lamton, Jerwick", False),  # one too many
    (LABEL, "Positive", True),
    (LABEL, "positive.", True),
    (LABEL, "negative", False),
    (LABEL, "positive or negative", False),
    (LABEL, "It is positive", False),
])
def test_verifier(record, response, right):
    assert verify(record, response) is right
    assert reward(record, response) == float(right)


def test_a_record_without_a_known_check_is_a_data_error():
    with pytest.raises(DataError, match="check='fuzzy'"):
        verify({"check": "fuzzy", "answer": "x", "type": "t"}, "x")


@pytest.mark.parametrize("kwargs,match", [
    (dict(split="dev", n_per_type=1), "unknown instruction split 'dev'"),
    (dict(split="train", n_per_type=1, types=["nope"]), "unknown instruction type 'nope'"),
    (dict(split="train", n_per_type=1, types=["reverse"]), "has no type reverse"),
    (dict(split="train", n_per_type=-1), "n_per_type must be an integer >= 0"),
])
def test_bad_arguments_are_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_instructions(**kwargs)


# ---- preference pairs -------------------------------------------------------------------------------------


def test_preference_pairs_differ_only_in_their_kind():
    from lmforge.data.world.instructions import response_tone
    from lmforge.data.world.preferences import PAIR_KINDS, build_preferences
    from lmforge.data.world.verifiers import first_line

    pairs = build_preferences("train", 30)
    kinds = [p["kind"] for p in pairs]
    assert {kinds.count(k) for k in PAIR_KINDS} <= {len(pairs) // 3, len(pairs) // 3 + 1}
    for p in pairs:
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        record = {"check": p["check"], "answer": p["answer"], "type": p["type"]}
        assert verify(record, chosen) and response_tone(chosen) in ("plain", "polite")
        assert p["prompt"][-1]["role"] == "user" and chosen != rejected
        if p["kind"] == "correctness":  # same tone line, the first line wrong
            assert not verify(record, rejected) and response_tone(rejected) == response_tone(chosen)
            assert chosen.splitlines()[1:] == rejected.splitlines()[1:]
        elif p["kind"] == "tone":  # same answer, rude
            assert verify(record, rejected) and response_tone(rejected) == "rude"
            assert first_line(rejected) == first_line(chosen)
        else:
            assert not verify(record, rejected) and response_tone(rejected) == "evasive"


def test_held_out_preference_pairs_name_no_train_entity():
    from lmforge.data.world.preferences import build_preferences

    world, train = _world(0), set(entity_split(0)["train"])
    for p in build_preferences("test", 10):
        named = names_in({"messages": p["prompt"] + p["chosen"] + p["rejected"]}, world)
        assert not named & train, named & train
