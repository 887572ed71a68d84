"""`lmforge reward`, `lmforge dpo` and `lmforge eval reward` end to end on a tiny model, and the preference data's
one-line errors (issue 28)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.core.errors import DataError
from lmforge.data.preference_data import read_preferences, to_pairs
from tests.conftest import cli, run_cli
from tests.faults import assert_refused
from tests.sft_models import tiny_model_dir, write_jsonl

SMALL = ["max_steps=6", "data.n_train=2", "data.n_val=1", "data.n_test=2", "train.eval_every=3",
         "train.global_batch_size=8"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("pref") / "base")


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_reward_trains_saves_a_one_output_classifier_and_eval_reward_reads_it(base, tmp_path):
    from lmforge.data.world.preferences import build_preferences

    held_out = write_jsonl(tmp_path / "held_out.jsonl", build_preferences("test", 2))
    out = last_json(run_cli("reward", f"model={base}", f"run_dir={tmp_path / 'rm'}", f"data.test={held_out}",
                            *SMALL))
    assert {"all", "correctness", "tone", "evasive"} <= set(out["test"])
    config = json.loads((tmp_path / "rm" / "model" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["problem_type"] == "regression"
    again = last_json(cli("eval", "reward", "--model", str(tmp_path / "rm"), "--data", str(held_out), "--json"))
    assert again["accuracy"]["all"]["pairs"] == out["test"]["all"]["pairs"]
    assert again["accuracy"]["all"]["accuracy"] == pytest.approx(out["test"]["all"]["accuracy"])


def test_eval_reward_refuses_a_language_model(base):
    assert_refused(cli("eval", "reward", "--model", str(base)), "no score head", "lmforge reward")


def test_dpo_with_a_copy_and_with_precomputed_log_probs_train_alike(base, tmp_path):
    """Both references are the starting model: the same losses; precomputed runs no reference forward in training,
    and a resumed run reads its cache instead of computing it again."""
    runs = {ref: last_json(run_cli("dpo", f"model={base}", f"run_dir={tmp_path / ref}", f"dpo.reference={ref}",
                                   *SMALL)) for ref in ("copy", "precomputed")}
    assert runs["precomputed"]["last"]["loss"] == pytest.approx(runs["copy"]["last"]["loss"], rel=1e-5)
    assert runs["precomputed"]["last"]["rewards/margins"] == pytest.approx(runs["copy"]["last"]["rewards/margins"],
                                                                           rel=1e-4, abs=1e-6)
    assert runs["precomputed"]["test"] == runs["copy"]["test"]  # accuracies of the same scores
    assert runs["copy"]["reference_forwards"] > 0 and runs["precomputed"]["reference_forwards"] == 0
    assert runs["precomputed"]["reference_precomputed"] > 0
    assert (tmp_path / "precomputed" / "reference_logps.pt").is_file()
    resumed = last_json(run_cli("dpo", f"model={base}", f"run_dir={tmp_path / 'precomputed'}",
                                "dpo.reference=precomputed", "resume=true", *SMALL[1:], "max_steps=8"))
    assert resumed["reference_precomputed"] == 0 and resumed["last"]["step"] == 8
    gen = json.loads((tmp_path / "copy" / "model" / "generation_config.json").read_text())
    assert gen["eos_token_id"]  # stops at the chat format's end of turn


def test_dpo_with_lora_uses_the_disabled_delta_as_reference(base, tmp_path):
    out = last_json(run_cli("dpo", f"model={base}", f"run_dir={tmp_path / 'lora'}", "peft.method=lora", *SMALL,
                            "train.log_every=1"))
    assert out["reference"] == "disabled" and out["reference_forwards"] > 0
    # at step 1 policy = reference: the first logged loss is DPO's ln 2
    first = json.loads((tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(0.6931, abs=2e-3)


def test_dpo_reference_model_must_share_the_policys_vocabulary(base, tmp_path):
    first = last_json(run_cli("dpo", f"model={base}", f"run_dir={tmp_path / 'a'}", *SMALL))  # ChatML added, saved
    policy = tmp_path / "a" / "model"
    same = last_json(run_cli("dpo", f"model={policy}", f"dpo.reference_model={policy}", f"run_dir={tmp_path / 'b'}",
                             *SMALL))
    assert same["reference"] == "copy" and same["reference_forwards"] > 0 and first["reference"] == "copy"
    other = tiny_model_dir(tmp_path / "other", ordinary_tokens=["zzz"])  # a token the policy does not have
    assert_refused(cli("dpo", f"model={policy}", f"dpo.reference_model={other}", f"run_dir={tmp_path / 'c'}",
                       *SMALL), f"dpo.reference_model={other}", "vocabulary", "policy's tokenizer")
    assert_refused(cli("dpo", f"model={policy}", f"dpo.reference_model={policy}", "dpo.reference=precomputed",
                       f"run_dir={tmp_path / 'd'}", *SMALL), "dpo.reference_model", "dpo.reference=copy")


def test_dpo_refuses_a_disabled_reference_without_a_delta(base, tmp_path):
    assert_refused(cli("dpo", f"model={base}", f"run_dir={tmp_path / 'r'}", "dpo.reference=disabled", *SMALL),
                   "dpo.reference=disabled")


# ---- preference data ----------------------------------------------------------------------------------------


def test_formats_strings_messages_implicit_prompt_and_rankings(tmp_path):
    rows = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "margin": 0.5},
        {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]},
        {"prompt": "Rank these", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
    ]
    pairs = list(read_preferences(str(write_jsonl(tmp_path / "p.jsonl", rows))))
    assert len(pairs) == 3 + 3
    assert pairs[0].prompt == [{"role": "user", "content": "Hi?"}] and pairs[0].margin == 0.5
    assert pairs[2].prompt == [{"role": "user", "content": "Q"}]
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs[3:]] == [("c", "a"), ("c", "b"),
                                                                                       ("a", "b")]
    assert all(p.weight == pytest.approx(1 / 3) for p in pairs[3:]) and pairs[3].where.endswith(":4")


@pytest.mark.parametrize("rec,match", [
    ({"prompt": "x", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "x", "chosen": "a"}, "no 'rejected' field"),
    ({"prompt": "x", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "repeated \\[0\\]"),
    ({"prompt": "x", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "missing \\[2\\]"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "share no first message"),
    ({"prompt": "x", "chosen": [{"role": "wizard", "content": "a"}], "rejected": "b"}, "unknown role"),
])
def test_bad_records_are_one_line_with_file_and_line(rec, match):
    with pytest.raises(DataError, match=match) as e:
        to_pairs(rec, "prefs.jsonl:3")
    assert str(e.value).startswith("prefs.jsonl:3:") and "\n" not in str(e.value)


def test_a_bad_file_is_refused_by_the_cli_naming_its_line(base, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                               {"prompt": "a", "chosen": "b", "rejected": "b"}])
    assert_refused(cli("dpo", f"model={base}", f"run_dir={tmp_path / 'r'}", f"data.train={bad}", *SMALL),
                   "bad.jsonl:2", "identical")


def test_a_prompt_longer_than_max_length_is_dropped_and_counted(base, tmp_path):
    rows = [{"prompt": "What is 1 plus one? " * 40, "chosen": "It is 2.", "rejected": "It is 3."},
            {"prompt": "What is 2 plus one?", "chosen": "It is 3.", "rejected": "It is 4."}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    out = last_json(run_cli("dpo", f"model={base}", f"run_dir={tmp_path / 'r'}", f"data.train={data}",
                            "data.max_length=64", "max_steps=1", "train.global_batch_size=1"))
    assert out["data"]["train"] == {"pairs": 2, "truncated": 0, "dropped": 1}


def test_eval_tone_prints_its_line_and_refuses_bad_models(base, tmp_path):
    out = cli("eval", "tone", "--model", str(base), "--n", "1", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["all"]["n"] >= 1 and result["all"]["n"] + result["skipped"] >= 10  # a long prompt is skipped, counted
    assert 0.0 <= result["all"]["rude_or_evasive"] <= 1.0
    assert sum(result["all"][t] for t in ("rude", "evasive", "polite", "plain")) == pytest.approx(1.0)
    line = cli("eval", "tone", "--model", str(base), "--n", "1")
    assert line.returncode == 0 and line.stdout.strip().startswith("rude or evasive ")
    assert_refused(cli("eval", "tone", "--model", str(tmp_path / "missing")), "missing")
    assert_refused(cli("eval", "tone", "--model", str(base), "--n", "0"), "--n")
