"""In-context scoring against lm-evaluation-harness 0.4.13 (issue 25): on a small task file and a random GPT-2 saved
as an HF dir, lmforge's per-request log-likelihoods equal those of lm-eval's own ``hf`` model (HFLM on the same
dir) within 1e-4, and ``is_greedy``, ``acc`` and ``acc_norm`` are the same, zero-shot and 2-shot (the contexts
are lm-eval's own, from its logged samples, and lmforge's prompt builder gives the same strings)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.core.tokenizer import Tokenizer
from lmforge.data.incontext import file_task, prompts
from lmforge.eval.choice import ChoiceItem, encode_pair, score_choices, score_requests, score_requests_per_choice
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.io import load_model, save_model

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "the sun is warm today",
         "Q: what colour is the sky?\nA: blue", "three plus four is seven"] * 20
DOCS = [
    {"question": "Q: What sat on the mat?\nA:", "choices": ["the cat", "a dog", "birds"], "answer": 0},
    {"question": "Q: Where did the dog run?\nA:", "choices": ["in the park", "at dawn"], "answer": 0},
    {"question": "Q: When do birds sing? ", "choices": ["at dawn", "today", "on the mat", "warm"], "answer": 0},
    {"question": "Q: What is three plus four?\nA:", "choices": ["seven", "six", "eight"], "answer": 0},
    {"question": "Q: What colour is the sky?\nA:", "choices": ["blue", "the sun is warm", "red"], "answer": 0},
    {"question": "Q: Is the sun warm today?\nA:", "choices": ["yes", "no"], "answer": 1},
    {"question": "the cat", "choices": ["sat", "ran", "sang"], "answer": 0},
]
TASK_YAML = """task: lmforge_parity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm-eval")
    tok = Tokenizer.train(TEXTS, vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"])
    torch.manual_seed(0)
    cfg = DecoderConfig(family="gpt2", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=64,
                        dropout=0.0, eos_token_id=tok.token_to_id("<|endoftext|>"),
                        pad_token_id=tok.token_to_id("<|pad|>"))
    save_model(DecoderLM(cfg).eval(), d / "model", tokenizer=tok)
    data = d / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DOCS))
    (d / "tasks").mkdir()
    (d / "tasks" / "parity.yaml").write_text(TASK_YAML.format(path=data))
    model, tok = load_model(d / "model")
    return d, model, tok


def _lm_eval(d, shots):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args=f"pretrained={d / 'model'},dtype=float32", device="cpu",
                          tasks=["lmforge_parity"], num_fewshot=shots, batch_size=4, log_samples=True,
                          task_manager=TaskManager(include_path=str(d / "tasks")), random_seed=0,
                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=1234)
    return out["samples"]["lmforge_parity"]


@pytest.mark.parametrize("shots", [0, 2])
def test_requests_and_metrics_equal_lm_evals_hf_model(setup, shots):
    d, model, tok = setup
    samples = sorted(_lm_eval(d, shots), key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    contexts = [s["arguments"][0][0] if isinstance(s["arguments"][0], (list, tuple)) else
                s["arguments"]["gen_args_0"]["arg_0"] for s in samples]
    # lmforge's prompt builder draws the same demonstrations from the same seed
    assert prompts(file_task(str(d / "task.jsonl")), shots, seed=1234) == contexts
    items = [ChoiceItem(c, tuple(doc["choices"]), doc["answer"]) for c, doc in zip(contexts, DOCS)]
    scores = score_choices(model, tok, items)
    for s, sc, doc in zip(samples, scores, DOCS):
        ref = [(float(r[0][0]), bool(r[0][1])) for r in s["resps"]]
        assert len(ref) == len(doc["choices"])
        for (ll, greedy), mine, g in zip(ref, sc.loglikelihoods, sc.is_greedy):
            assert math.isclose(mine, ll, abs_tol=1e-4), (mine, ll)
            assert g == greedy
        assert sc.acc == s["acc"] and sc.acc_norm == s["acc_norm"]


def test_packed_rows_equal_one_row_per_choice(setup):
    """The shared-context layout gives each continuation the logits its own row gives (and the context truncation
    path, rows longer than the window, is lm-eval's: left-cut to max_len + 1, the last token dropped)."""
    _, model, tok = setup
    long_ctx = " ".join(TEXTS[:30])  # far longer than the 64-position window
    pairs = [encode_pair(tok, c, " " + k) for c in ("Q: What sat on the mat?\nA:", "birds", long_ctx)
             for k in ("the cat", "a dog ran", "x")]
    assert len(pairs[-1][0]) > 64
    a = score_requests(model, pairs, batch_tokens=64)
    b = score_requests_per_choice(model, pairs, batch_size=2)
    for (la, ga), (lb, gb) in zip(a, b):
        assert math.isclose(la, lb, abs_tol=1e-5) and ga == gb


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding(setup):
    _, _, tok = setup
    ctx, cont = encode_pair(tok, "the cat  ", "sat")
    assert ctx == tok.encode("the cat") and ctx + cont == tok.encode("the cat  sat")
    ctx, cont = encode_pair(tok, "", "the cat")
    assert ctx == [tok.eos_id] and cont == tok.encode("the cat")


def test_eval_harness_runs_lmforges_model_on_a_local_task(setup):
    """`lmforge eval harness`: lmforge's registered model type on the local task YAML (nothing downloaded) gives
    lm-eval's HFLM's acc and acc_norm and, per request, its log-likelihoods."""
    from tests.conftest import cli

    d, _, _ = setup
    args = ["eval", "harness", "--model", str(d / "model"), "--tasks", "lmforge_parity", "--include-path",
            str(d / "tasks"), "--num-fewshot", "1", "--json"]
    mine, ref = cli(*args), cli(*args, "--model-type", "hf")
    assert mine.returncode == 0 and ref.returncode == 0, mine.stderr[-2000:] + ref.stderr[-2000:]
    a = json.loads(mine.stdout.strip().splitlines()[-1])["results"]["lmforge_parity"]
    b = json.loads(ref.stdout.strip().splitlines()[-1])["results"]["lmforge_parity"]
    assert a["acc,none"] == b["acc,none"] and a["acc_norm,none"] == b["acc_norm,none"]
    r = cli("eval", "harness", "--model", str(d / "model"), "--tasks", "no_such_task", "--include-path",
            str(d / "tasks"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "unknown lm-eval task 'no_such_task'" in r.stderr


def test_rolling_loglikelihood_and_generation_equal_hflm(setup):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import register

    d, _, _ = setup
    mine, ref = register()(pretrained=str(d / "model"), device="cpu"), HFLM(pretrained=str(d / "model"),
                                                                           dtype="float32", device="cpu")
    text = " ".join(TEXTS[:12])  # longer than the 64-token window: several rolling windows
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert math.isclose(mine.loglikelihood_rolling(req)[0], ref.loglikelihood_rolling(req)[0], rel_tol=1e-5)
    gen = [Instance("generate_until", {}, ("the cat", {"until": ["\n", "mat"], "max_gen_toks": 12,
                                                        "do_sample": False}), 0)]
    assert mine.generate_until(gen) == ref.generate_until(gen)
