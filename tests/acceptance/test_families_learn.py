"""Tiny BERT and T5 pretrain on the built-in world on CPU with the same command and learn: masked-token,
next-sentence and span-corruption target-token accuracies well above their baselines (majority class from
the same validation batches; 0.5 for NSP).  The GPT family is covered by test_pipeline.py."""

import json

import pytest

from tests.conftest import ROOT, run_cli


@pytest.mark.parametrize("family,steps", [("bert", 600), ("t5", 300)])
def test_family_pretrains_and_learns(tmp_path, family, steps):
    run_dir = tmp_path / family
    proc = run_cli("pipeline", str(ROOT / f"configs/tiny-{family}.yaml"), f"run_dir={run_dir}", f"max_steps={steps}",
                   timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(proc.stdout.strip().splitlines()[-1])
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
