"""Instruction exact match (lmforge/eval/instructions.py, recipes/instructions.py) and world-instructions SFT data."""

from __future__ import annotations

import pytest

from lmforge.core.errors import ConfigError
from lmforge.data.chat import CHATML_TEMPLATE, ChatFormat
from lmforge.data.world.instructions import HELD_OUT_TYPES, build_instructions, response_tone, split_types
from lmforge.eval import instructions as ei
from lmforge.data.world.verifiers import verify
from lmforge.eval.sampling import GenerationResult
from lmforge.models.io import load_model
from lmforge.recipes.instructions import demonstrations, plain_answer, summarise
from lmforge.recipes.sft import SFTDataConfig, load_conversations
from tests.sft_models import tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(tiny_model_dir(tmp_path_factory.mktemp("m") / "m"))


def test_plain_prompt_is_q_and_a_blocks_ending_in_a(tiny):
    _, tok = tiny
    p = ei.Prompter(tok)
    assert p.form == ei.PLAIN and p.stop_ids() is None
    msgs = [{"role": "user", "content": "List: a, b"}, {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Which was first?"}]
    demo = [{"role": "user", "content": "Count: x, y"}, {"role": "assistant", "content": "2"}]
    assert tok.decode(p.ids(msgs, [demo])) == "Q: Count: x, y\nA: 2\n\nQ: List: a, b\nA: Noted.\nQ: Which was first?\nA:"


def test_chat_prompt_is_the_template_with_demos_as_earlier_turns(tiny):
    _, tok = tiny
    tok.chat_template = CHATML_TEMPLATE
    try:
        p = ei.Prompter(tok)
        msgs = [{"role": "user", "content": "Which was first?"}]
        demo = [{"role": "user", "content": "Count: x, y"}, {"role": "assistant", "content": "2"}]
        assert p.form == ei.CHAT
        assert p.ids(msgs, [demo]) == ChatFormat(tok).prompt_ids(demo + msgs)
    finally:
        tok.chat_template = None


def _fake_generate(replies):
    """generate() stand-in: each prompt's reply looked up by its decoded text's last question."""
    def run(model, prompts, cfg, tokenizer=None, **kw):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            out.append(GenerationResult(ids[:1], [0.0], [0.0], "stop", replies(text), len(ids)))
        return out
    return run


def test_scores_follow_the_verifier_and_keep_record_order(tiny, monkeypatch):
    model, tok = tiny
    recs = build_instructions("test_entities", 3, types=["count", "sort"])
    # right for count, wrong (the reversed list) for sort; generation is batched by length, verdicts come back in
    # the records' order
    def reply(text):
        rec = next(r for r in recs if text == tok.decode(ei.Prompter(tok).ids(ei.question(r))))
        return plain_answer(rec) if rec["type"] == "count" else ", ".join(rec["answer"][::-1])
    monkeypatch.setattr(ei, "generate", _fake_generate(reply))
    scores = ei.score_instructions(model, tok, recs, batch_size=2, max_new_tokens=4)
    assert scores.skipped == 0  # (the tiny tokenizer spells unseen names byte by byte: long prompts)
    assert [s.record for s in scores.scored] == recs
    assert [s.correct for s in scores.scored] == [r["type"] == "count" for r in recs]
    assert ei.accuracy(scores.scored) == 0.5


def test_demos_are_dropped_to_fit_and_overlong_records_skipped(tiny, monkeypatch):
    model, tok = tiny  # a 128-token context
    monkeypatch.setattr(ei, "generate", _fake_generate(lambda text: "x"))
    short = {"messages": [{"role": "user", "content": "Count: a, b"}, {"role": "assistant", "content": "2"}],
             "type": "count", "check": "number", "answer": 2}
    long = {**short, "messages": [{"role": "user", "content": "Mira lives in Tovel. " * 40}, short["messages"][1]]}
    demo = [{"role": "user", "content": "What is 3 plus one? " * 6}, {"role": "assistant", "content": "It is 4."}]
    scores = ei.score_instructions(model, tok, [short, long], demos={"count": [demo] * 5}, shots=5,
                                   max_new_tokens=16)
    assert scores.skipped == 1 and len(scores.scored) == 1
    kept = scores.scored[0].shots
    assert 0 < kept < 5
    assert len(ei.Prompter(tok).ids(ei.question(short), [demo] * kept)) + 16 <= 128
    assert len(ei.Prompter(tok).ids(ei.question(short), [demo] * (kept + 1))) + 16 > 128


def test_demonstrations_come_from_train_entities_for_every_type_held_out_included():
    demos = demonstrations(2, seed=0, world_seed=0)
    assert set(HELD_OUT_TYPES) <= set(demos)
    for name, ds in demos.items():
        assert len(ds) == 2 and all(d[-1]["role"] == "assistant" for d in ds)
    train = {tuple(m["content"] for m in r["messages"][:-1]) for r in
             build_instructions("train", 2, types=["count"], held_out=())}
    assert {tuple(m["content"] for m in d[:-1]) for d in demos["count"]} == train
    assert demonstrations(0, 0, 0) == {}


def test_summary_is_the_mean_over_types_per_split_and_kind():
    rows = [{"split": "test_entities", "kind": "in_context", "type": "a", "sft": 1.0},
            {"split": "test_entities", "kind": "in_context", "type": "b", "sft": 0.5},
            {"split": "test_entities", "kind": "closed_book", "type": "c", "sft": None}]
    out = summarise(rows, ["sft"])
    assert out[0] == {"split": "test_entities", "kind": "in_context", "types": 2, "sft": 0.75}
    assert out[1]["sft"] is None


def test_world_instructions_as_sft_data_size_types_and_tone():
    data = load_conversations(SFTDataConfig(train="world-instructions", n_train=50, n_val=10))
    assert len(data["train"]) == 50 and len(data["validation"]) == 10
    assert not {c.where.split("/")[-1] for c in data["train"]} & set(HELD_OUT_TYPES)
    assert {c.where.split("/")[-1] for c in data["train"]} == set(split_types("train"))
    # the rude/evasive answers of phrasing 2 stay in SFT data
    many = load_conversations(SFTDataConfig(train="world-instructions", n_train=400, n_val=1))["train"]
    replies = [c.messages[-1]["content"] for c in many]
    assert {"rude", "evasive"} <= {response_tone(r) for r in replies}
    focused = load_conversations(SFTDataConfig(train="world-instructions", n_train=20, n_val=2,
                                               types=["count", "sort"]))["train"]
    assert {c.where.split("/")[-1] for c in focused} == {"count", "sort"}
    with pytest.raises(ConfigError, match="reverse"):
        load_conversations(SFTDataConfig(train="world-instructions", n_train=5, n_val=1, types=["reverse"]))
    with pytest.raises(ConfigError, match="data.types"):
        load_conversations(SFTDataConfig(train="world-qa-closed", n_train=5, n_val=1, types=["count"]))


def test_closed_book_candidates_hold_the_answer_once_and_its_near_misses():
    recs = build_instructions("test_entities", 10, types=["fact", "arithmetic", "kind"])
    for r in recs:
        options = ei.candidates(r)
        assert options is not None and len(options) >= 2, r
        assert sum(verify(r, o) for o in options) == 1, (r["answer"], options)
        if r["check"] == "number":  # the verifier's near misses: off by one or two
            assert {int(o) for o in options} <= set(range(int(r["answer"]) - 2, int(r["answer"]) + 3))
        if r["type"] == "kind":
            assert len(options) == 5


def test_choice_accuracy_picks_the_most_likely_candidate(tiny, monkeypatch):
    model, tok = tiny
    recs = build_instructions("test_entities", 4, types=["kind", "arithmetic"])
    # a scorer that prefers the right answer on kind and the first candidate on arithmetic
    def fake(model, tokenizer, items, target_delimiter=" "):
        assert target_delimiter == " " and all(it.context.endswith("\nA:") for it in items)
        return [type("S", (), {"acc": float(it.where == "kind" or it.answer == 0)})() for it in items]
    monkeypatch.setattr(ei, "score_choices", fake)
    out = ei.choice_accuracy(model, tok, recs)
    assert out["kind"] == {"acc": 1.0, "chance": pytest.approx(0.2), "n": 4}
    firsts = [ei.candidates(r)[0] for r in recs if r["type"] == "arithmetic"]
    right_first = sum(verify(r, f) for r, f in zip([r for r in recs if r["type"] == "arithmetic"], firsts))
    assert out["arithmetic"]["acc"] == right_first / 4
