"""`lmforge w2s` for real, small (CI budget: 5 minutes on 2 cores; not the shared pipeline): two GPT-2-style models
pretrained here on the built-in world — a weak one (d 32, 1 layer, 60 steps) and a strong one (d 128, 3 layers, 300
steps) — then the weak-to-strong experiment on world-sentiment with one seed.  The strong ceiling must beat the weak
supervisor by 10 points (the calibration the experiment needs), and the students trained on weak labels must follow
their supervisor more closely than the ceiling does (what supervision by a weak model means).  PGR is reported, not
asserted: benchmarks/RESULTS.md holds the 3-seed study."""

import json

import pytest

from tests.conftest import ROOT, run_cli

PRETRAIN = [str(ROOT / "configs/tiny-gpt2.yaml"), "resume=false", "train.eval_every=0", "train.ckpt_every=0",
            "train.log_every=50", "data.world_bytes=3000000", "tokenizer.train_bytes=1000000"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("w2s-models")
    for name, steps, extra in (("weak", 60, ["model.d_model=32", "model.n_layer=1", "model.n_head=2"]),
                               ("strong", 300, ["model.d_model=128", "model.n_layer=3", "model.n_head=4"])):
        proc = run_cli("pretrain", *PRETRAIN, f"run_dir={root / name}", f"max_steps={steps}", *extra, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_w2s_ceiling_beats_weak_and_students_follow_the_weak_labels(models, tmp_path):
    run_dir = tmp_path / "w2s"
    proc = run_cli("w2s", str(ROOT / "configs/w2s-sentiment.yaml"), f"run_dir={run_dir}",
                   f"weak.model={models / 'weak'}", f"strong.model={models / 'strong'}", "seeds=[0]",
                   "task.n_train=900", "task.n_test=300", "n_weak=300", "n_student=600", "bootstrap=200",
                   "weak.overrides=[train.lr=3.0e-3]",
                   "finetune=[max_steps=100,train.global_batch_size=32,train.micro_batch_size=16,train.eval_every=0,"
                   "train.ckpt_every=50,train.log_every=20,train.warmup_steps=10,eval_batch_size=100]", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((run_dir / "w2s.json").read_text())
    acc = {r["model"]: r["accuracy_median"] for r in out["accuracy"]}
    assert acc["ceiling"] >= acc["weak"] + 0.10, acc
    seed = out["per_seed"][0]
    for student in ("w2s-ce", "w2s-logconf"):
        assert seed["agreement"][student]["all"] > seed["agreement"]["ceiling"]["all"], seed["agreement"]
    for row in out["pgr"]:
        assert row["pgr_median"] is not None and row["pgr_interval"] is not None
    assert "Performance gap recovered" in (run_dir / "report.md").read_text()
