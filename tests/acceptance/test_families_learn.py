"""Tiny BERT and T5 pretrain on the built-in world on CPU with the same command and learn: masked-token,
next-sentence and T5 target-token accuracies (span corruption + text infilling, configs/tiny-t5.yaml) well above
their baselines (majority class from the same validation batches; 0.5 for NSP).  The GPT family is covered by
test_pipeline.py."""

import json

import pytest



@pytest.mark.parametrize("family", ["bert", "t5"])
def test_family_pretrains_and_learns(pipeline_run, family):
    run_dir, s = pipeline_run(family)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    print(f"\n{family}: {s}")
    if family == "bert":
        # Post-LN BERT leaves the unigram plateau slowly: at 600 steps (~8 min on 2 cores) masked-token accuracy
        # is ~2.8x the majority baseline and NSP ~0.79 (calibration run, see the issue note).
        assert s["val_mlm_acc"] >= max(0.12, 2 * s["majority_mlm_acc"])
        assert s["val_nsp_acc"] >= 0.65
    else:
        assert s["val_target_acc"] >= max(0.25, 2.5 * s["majority_target_acc"])
    assert "## Evaluation" in (run_dir / "report.md").read_text()
