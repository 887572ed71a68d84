"""`lmforge w2s` end to end on small random GPT-2 checkpoints and a user task file: the runs, the summary and the
report; a run killed mid-way resumes without redoing the runs that finished, and a finished one is reused whole;
each bad input is one line (a strong model smaller than the weak one is warned about, not refused)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, cli, run_cli
from tests.smoke.test_cli import assert_clean_error

transformers = pytest.importorskip("transformers")

WORDS = ["good", "bad", "lovely", "awful", "fine", "poor"]
TEXTS = [f"item {i} was {'not ' if i % 3 == 0 else ''}{WORDS[i % 6]}" for i in range(240)]
FAST = ["finetune=[max_steps=8,train.global_batch_size=8,train.micro_batch_size=4,train.eval_every=0,"
        "train.ckpt_every=2,train.log_every=2,train.warmup_steps=1,train.lr=1e-3,eval_batch_size=32]",
        "n_weak=40", "n_student=60", "seeds=[0]", "bootstrap=50"]


def _label(text: str) -> str:
    good = any(w in text.split()[-1] for w in ("good", "lovely", "fine"))
    return "pos" if good != (" not " in text) else "neg"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lmforge.core.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("w2s")
    tok = Tokenizer.train(TEXTS, vocab_size=300, special_tokens=["<|endoftext|>"])
    for name, width, layers in (("small", 16, 1), ("large", 48, 2)):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=tok.vocab_size, n_positions=32, n_embd=width, n_layer=layers, n_head=2,
            bos_token_id=tok.eos_id, eos_token_id=tok.eos_id))
        model.save_pretrained(root / name)
        tok.save(root / name)
    rows = [{"text": t, "label": _label(t)} for t in TEXTS]
    for split, part in (("train", rows[:140]), ("validation", rows[140:170]), ("test", rows[170:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return root


def _args(setup, run_dir, *extra):
    return ["w2s", f"run_dir={run_dir}", "task.name=null", f"task.train={setup / 'train.jsonl'}",
            f"task.validation={setup / 'validation.jsonl'}", f"task.test={setup / 'test.jsonl'}",
            f"weak.model={setup / 'small'}", f"strong.model={setup / 'large'}", *FAST, *extra]


def _mtimes(run_dir):
    return {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("seed0/*/results.json")}


def test_w2s_runs_summarizes_and_reuses(setup, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*_args(setup, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((run_dir / "w2s.json").read_text())
    names = [r["model"] for r in out["accuracy"]]
    assert names == ["weak", "ceiling", "w2s-ce", "w2s-logconf"]
    assert [r["student"] for r in out["pgr"]] == ["w2s-ce", "w2s-logconf"]
    for r in out["accuracy"]:
        acc = r["accuracy_per_seed"][0]
        assert 0.0 <= acc <= 1.0 and r["accuracy_interval"][0] <= r["accuracy_median"] <= r["accuracy_interval"][1]
    # the student was trained on the weak labels: its train file's labels are the weak model's argmax on B
    probs = json.loads((run_dir / "seed0/weak/weak-probs.json").read_text())
    assert len(probs["train"]) == 60 and len(probs["test"]) == 70
    student_labels = [json.loads(l)["label"] for l in (run_dir / "seed0/B-weak.jsonl").read_text().splitlines()]
    assert student_labels == [["neg", "pos"][int(p[1] > p[0])] for p in probs["train"]]
    # no checkpoint is chosen on ground truth: every run keeps its final model
    for d in ("weak", "strong-ce", "strong-logconf", "ceiling"):
        res = json.loads((run_dir / "seed0" / d / "results.json").read_text())
        assert res["selected"] == "final" and res["last"]["step"] == 8
    report = (run_dir / "report.md").read_text()
    assert "Performance gap recovered" in report and (run_dir / "w2s.png").is_file()
    # a second run redoes nothing
    before = _mtimes(run_dir)
    again = run_cli(*_args(setup, run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished before, reused") == 4 and _mtimes(run_dir) == before
    assert json.loads((run_dir / "w2s.json").read_text())["accuracy"] == out["accuracy"]
    # another confidence-loss setting is another student run; the weak and ceiling runs are reused
    third = run_cli(*_args(setup, run_dir, "aux_coef=0.25", "losses=[logconf]"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stderr.count("finished before, reused") == 2


def test_w2s_killed_resumes_without_redoing_finished_runs(setup, tmp_path):
    run_dir = tmp_path / "run"
    args = _args(setup, run_dir, "finetune=[max_steps=60,train.global_batch_size=8,train.micro_batch_size=4,"
                 "train.eval_every=0,train.ckpt_every=2,train.log_every=2,train.warmup_steps=1,train.lr=1e-3]")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    ckpts = run_dir / "seed0/strong-ce/checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.is_dir() and any(ckpts.glob("step_*/COMPLETE"))):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-way through the first student's training
    proc.wait()
    weak_done = (run_dir / "seed0/weak/results.json").stat().st_mtime_ns
    assert not (run_dir / "seed0/strong-ce/results.json").exists()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "seed0/weak: finished before, reused" in again.stderr
    assert (run_dir / "seed0/weak/results.json").stat().st_mtime_ns == weak_done
    steps = [json.loads(l)["step"] for l in (run_dir / "seed0/strong-ce/metrics.jsonl").read_text().splitlines()
             if '"loss"' in l]
    assert steps == list(range(2, 61, 2))  # resumed from its checkpoint: every step once, none twice


def test_w2s_bad_inputs_are_one_line(setup, tmp_path):
    proc = cli(*_args(setup, tmp_path / "a", "n_student=120"))
    assert_clean_error(proc, "n_weak=40 + n_student=120 = 160 exceeds the task's 140 training examples")
    # a weak model that is a classifier of another label set
    other = tmp_path / "other"
    model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=3, pad_token_id=0,
        id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}))
    model.save_pretrained(other)
    proc = cli(*_args(setup, tmp_path / "b", f"weak.model={other}"))
    assert_clean_error(proc, "is a classifier with labels ['a', 'b', 'c'], not the task's ['neg', 'pos']")
    proc = cli(*_args(setup, tmp_path / "c", "losses=[hinge]"))
    assert_clean_error(proc, "losses")
    proc = cli(*_args(setup, tmp_path / "d", "task.test=null"))
    assert_clean_error(proc, "has no test split")


def test_strong_smaller_than_weak_is_warned_and_runs(setup, tmp_path):
    proc = run_cli(*_args(setup, tmp_path / "run", f"weak.model={setup / 'large'}", f"strong.model={setup / 'small'}",
                          "losses=[ce]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: strong.model has" in proc.stderr and "not more than weak.model's" in proc.stderr


def test_multiclass_task_refuses_the_confidence_loss_in_one_line(setup, tmp_path):
    rows = [{"text": t, "label": ["a", "b", "c"][i % 3]} for i, t in enumerate(TEXTS)]
    for split, part in (("train", rows[:140]), ("validation", rows[140:170]), ("test", rows[170:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    proc = cli("w2s", f"run_dir={tmp_path / 'run'}", "task.name=null", f"task.train={tmp_path / 'train.jsonl'}",
                   f"task.validation={tmp_path / 'validation.jsonl'}", f"task.test={tmp_path / 'test.jsonl'}",
                   f"weak.model={setup / 'small'}", f"strong.model={setup / 'large'}", *FAST)
    assert_clean_error(proc, "the auxiliary confidence loss (logconf) is binary")


def test_bootstrapping_chain_labels_disjoint_parts(setup, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*_args(setup, run_dir, f"chain=[{setup / 'large'}]", "losses=[ce]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((run_dir / "w2s.json").read_text())
    assert [r["student"] for r in out["pgr"]] == ["w2s-ce", "bootstrap-logconf"]
    first = (run_dir / "seed0/chain0-train.jsonl").read_text().splitlines()
    second = (run_dir / "seed0/chain1-train.jsonl").read_text().splitlines()
    assert len(first) == len(second) == 30  # B (60) in two disjoint halves
    texts = lambda lines: {json.loads(l)["text"] for l in lines}  # noqa: E731
    assert not texts(first) & texts(second)
    # the second step's labels are the intermediate model's argmax on the second half
    probs = json.loads((run_dir / "seed0/chain0/weak-probs.json").read_text())["train"]
    assert [json.loads(l)["label"] for l in second] == [["neg", "pos"][int(p[1] > p[0])] for p in probs]
