"""In-context evaluation (issue 25): tasks and k-shot prompts (data/incontext.py), the scoring rules of
eval/choice.py against their definitions, and `lmforge eval choice` with its one-line errors."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from lmforge.apps.report import Report
from lmforge.apps.stage import Context
from lmforge.apps.stage_incontext import PipelineInContextConfig, stage_incontext
from lmforge.core.errors import ConfigError, DataError
from lmforge.core.tokenizer import Tokenizer
from lmforge.data.incontext import WORLD_TASKS, Example, Task, file_task, load_task, prompts
from lmforge.eval.choice import ChoiceItem, choice_metrics, encode_pair, score_choices, score_requests_per_choice
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.encoder import EncoderLM
from lmforge.models.encoder_config import EncoderConfig
from lmforge.models.io import save_model
from tests.conftest import cli

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Q: What is 2 + 2?\nA: 4", "the cat sat on the mat", "Q: Is it true?\nA: true", "birds sing"] * 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("incontext")
    tok = Tokenizer.train(TEXTS, vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"])
    torch.manual_seed(0)
    cfg = DecoderConfig(family="gpt2", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=128,
                        dropout=0.0, eos_token_id=tok.token_to_id("<|endoftext|>"))
    model = DecoderLM(cfg).eval()
    save_model(model, d / "gpt2", tokenizer=tok)
    bert = EncoderLM(EncoderConfig(vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=32))
    save_model(bert, d / "bert", tokenizer=tok)
    return d, model, tok


def _file(tmp_path, rows, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


ROWS = [{"question": f"Q: item {i}?\nA:", "choices": ["yes", "no", "maybe"], "answer": i % 3} for i in range(10)]


# -- tasks and prompts -------------------------------------------------------------------------------------

def test_world_tasks_have_valid_choices_and_answers():
    for name in WORLD_TASKS:
        t = load_task(name, n=20, pool_size=10)
        assert len(t.examples) == 20 and len(t.pool) == 10, name
        for ex in t.examples + t.pool:
            assert ex.question.startswith("Q: ") and ex.question.endswith("\nA:")
            if ex.choices is not None:
                assert len(set(ex.choices)) == len(ex.choices) >= 2 and 0 <= ex.answer < len(ex.choices)
        # demonstrations are other records: none is an evaluated question
        assert not {e.question for e in t.examples} & {e.question for e in t.pool}, name


def test_arithmetic_choices_hold_the_true_result():
    t = load_task("world-arithmetic", n=30, pool_size=4)
    for ex in t.examples:
        x, op, y = ex.question.split("?")[0].split()[-3:]  # "Q: What is 12 + 7?\nA:"
        if ex.question.startswith("Q: What is"):
            assert int(ex.target) == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y),
                                      "/": int(x) // max(int(y), 1)}[op]


def test_prompt_layout_and_lm_eval_sampling(tmp_path):
    task = file_task(str(_file(tmp_path, ROWS)))
    ctx = prompts(task, 2, seed=7, description="Answer.")
    rnd = random.Random(7)
    for ex, c in zip(task.examples, ctx):
        shots = [d for d in rnd.sample(task.pool, 3) if d != ex][:2]
        assert ex not in shots
        assert c == "Answer.\n\n" + "".join(f"{d.question} {d.target}\n\n" for d in shots) + ex.question
    assert prompts(task, 0) == [ex.question for ex in task.examples]
    c = prompts(task, 2, target_delimiter="", fewshot_delimiter="\n")[0]
    assert c.endswith("\n" + task.examples[0].question) and c.count("\nA:\n") == 0 and c.count("\nA:") == 3


def test_k_larger_than_the_pool_is_one_line(tmp_path):
    task = file_task(str(_file(tmp_path, ROWS[:4])))
    prompts(task, 3)
    with pytest.raises(ConfigError, match=r"k=4 shots but task 't.jsonl' has only 3 other examples"):
        prompts(task, 4)
    with pytest.raises(ConfigError, match=r"has only 5 demonstrations in its pool; use k <= 5 or a larger --pool"):
        prompts(load_task("world-kind", n=3, pool_size=5), 8)


def test_bad_task_files_name_file_and_line(tmp_path):
    one = _file(tmp_path, [ROWS[0], {"question": "Q?", "choices": ["only"], "answer": 0}], "one.jsonl")
    with pytest.raises(DataError, match=r"one.jsonl:2: 1 choice \['only'\]; a multiple-choice question needs at "
                                        r"least 2 choices"):
        file_task(str(one))
    out = _file(tmp_path, [{"question": "Q?", "choices": ["a", "b"], "answer": 2}], "out.jsonl")
    with pytest.raises(DataError, match=r"out.jsonl:1: answer 2 is not an index of its 2 choices \(0..1\)"):
        file_task(str(out))


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        load_task("world-facts")
    assert "unknown task 'world-facts'" in str(e.value) and all(n in str(e.value) for n in WORLD_TASKS)


# -- scoring rules ------------------------------------------------------------------------------------------

def test_scores_follow_their_definitions(tiny):
    """acc: argmax ll; acc_norm: argmax ll / characters; acc_bytes: argmax ll / UTF-8 bytes; each ll equals the
    one-row-per-choice sum of log-probs of the continuation's tokens."""
    _, model, tok = tiny
    items = [ChoiceItem("Q: What is 2 + 2?\nA:", ("4", "five", "the cat sat"), 0),
             ChoiceItem("birds", ("sing", "sat on the mat", "é"), 1),
             ChoiceItem("Q: Is it true? ", ("true", "false"), 1)]
    scores = score_choices(model, tok, items)
    for item, s in zip(items, scores):
        ref = score_requests_per_choice(model, [encode_pair(tok, item.context, " " + c) for c in item.choices])
        for ll, (r, g) in zip(s.loglikelihoods, ref):
            assert math.isclose(ll, r, abs_tol=1e-5)
        lls = torch.tensor(s.loglikelihoods)
        chars = torch.tensor([float(len(c)) for c in item.choices])
        nbytes = torch.tensor([float(len(c.encode())) for c in item.choices])
        assert s.pred == int(lls.argmax()) and s.acc == float(s.pred == item.answer)
        assert s.pred_norm == int((lls / chars).argmax()) and s.pred_bytes == int((lls / nbytes).argmax())
    m = choice_metrics(scores)
    assert m["n"] == 3 and math.isclose(m["chance"], (1 / 3 + 1 / 3 + 1 / 2) / 3)
    assert math.isclose(m["majority"], 2 / 3)  # answers 0, 1, 1: always choice 1 gets two of three
    assert m["acc"] == sum(s.acc for s in scores) / 3


def test_bad_items_are_one_line(tiny):
    _, model, tok = tiny
    with pytest.raises(DataError, match=r"q1: 1 choice \['a'\]; a multiple-choice question needs at least 2"):
        score_choices(model, tok, [ChoiceItem("x", ("a",), 0, "q1")])
    with pytest.raises(DataError, match=r"q2: answer 3 is not an index of its 2 choices"):
        score_choices(model, tok, [ChoiceItem("x", ("a", "b"), 3, "q2")])


# -- the command ---------------------------------------------------------------------------------------------

def test_eval_choice_command_scores_world_and_file_tasks(tiny, tmp_path):
    d, _, _ = tiny
    f = _file(tmp_path, ROWS)
    r = cli("eval", "choice", "--model", str(d / "gpt2"), "--tasks", "world-kind", "world-arithmetic-gen", str(f),
            "-k", "0", "2", "--limit", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])["results"]
    assert set(out) == {"world-kind", "world-arithmetic-gen", "t.jsonl"}
    assert out["world-kind"]["0"]["n"] == 6 and math.isclose(out["world-kind"]["2"]["chance"], 0.2)
    assert 0.0 <= out["world-arithmetic-gen"]["2"]["exact_match"] <= 1.0
    assert math.isclose(out["t.jsonl"]["0"]["chance"], 1 / 3)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "world-kinds"], "error: unknown task 'world-kinds'; the known tasks are world-fact"),
    (["--tasks", "world-kind", "-k", "9", "--pool", "8"], "error: k=9 shots but task 'world-kind' has only 8"),
])
def test_eval_choice_errors_are_one_line(tiny, args, message):
    d, _, _ = tiny
    r = cli("eval", "choice", "--model", str(d / "gpt2"), *args)
    assert r.returncode == 2 and r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1


def test_wrong_family_is_one_line(tiny):
    d, _, _ = tiny
    r = cli("eval", "choice", "--model", str(d / "bert"), "--tasks", "world-kind")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "is a bert encoder; `lmforge eval choice` scores causal decoders" in r.stderr


def test_pipeline_stage_says_why_it_does_not_score_an_encoder(tiny, tmp_path):
    _, _, tok = tiny
    bert = EncoderLM(EncoderConfig(vocab_size=tok.vocab_size, d_model=32, n_layer=1, n_head=4, max_seq_len=32))
    ctx = Context(cfg=SimpleNamespace(incontext=PipelineInContextConfig()), report=Report("r"), run_dir=tmp_path,
                  parts=SimpleNamespace(model=bert, tokenizer=tok))
    stage_incontext(ctx)
    (heading, body), = ctx.report.sections
    assert heading == "In-context (zero/few-shot)" and body.startswith("Not scored for bert: an encoder has no")
    assert ctx.results["incontext"] is None and not (tmp_path / "incontext.json").exists()
