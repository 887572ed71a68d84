"""Why pretraining matters, measured: each family's pipeline model fine-tuned on a world task, and the same
architecture fine-tuned from random initialisation with the same steps, data and seeds (3 seeds each).

Bars (issue 5): pretrained tiny GPT and BERT reach >= 95% test accuracy on world sentiment (a task where a
bag-of-words model scores <= 85%); random init scores >= 10 points lower (mean over the 3 seeds).  T5 on
open-book world QA does not reach its 90% exact-match bar yet (see the issue note), so it is not asserted here;
its fine-tuning path is exercised by tests/smoke/test_finetune.py.

BERT starts its classifier from a fresh pooler (`head.reinit_pooler`, configs/finetune-bert-sentiment.yaml): with
the NSP-trained one the pretrained runs stalled at chance for 100-300 steps and the gap was 0.076 (pretrained
[0.932, 0.976, 0.964], random [0.892, 0.852, 0.900]); with a fresh one, measured on this machine type (the runs are
deterministic there): pretrained [0.992, 0.976, 0.988], random [0.892, 0.852, 0.900], gap 0.104."""

import json

import pytest

from tests.conftest import ROOT, run_cli

CONFIGS = {"gpt2": "finetune-gpt2-sentiment.yaml", "bert": "finetune-bert-sentiment.yaml", "t5": "finetune-t5-qa.yaml"}


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_pretrained_beats_random_init(pipeline_run, tmp_path, family):
    run_dir, _ = pipeline_run(family)
    out = tmp_path / f"compare-{family}"
    proc = run_cli("finetune", str(ROOT / "configs" / CONFIGS[family]), "--compare", f"run_dir={out}",
                   f"model={run_dir / 'model'}", "train.tensorboard=false", timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "compare.json").read_text())
    pre, rnd = res["summary"]
    assert (pre["init"], rnd["init"], pre["runs"], rnd["runs"]) == ("pretrained", "random", 3, 3)
    base = res["baselines"]
    print(f"\n{family} {res['task']} test {res['metric']}: pretrained {pre['values']} (mean {pre['mean']:.3f}), "
          f"random {rnd['values']} (mean {rnd['mean']:.3f}); baselines {base}")
    assert res["metric"] == "accuracy" and pre["mean"] >= 0.95
    assert base["bag_of_words"]["accuracy"] <= 0.85  # the task needs more than keyword spotting
    report = (out / "report.md").read_text()
    assert "pretrained (3 seeds)" in report and "random (3 seeds)" in report and "baseline: majority" in report
    assert pre["mean"] - rnd["mean"] >= 0.10
