"""`lmforge scaling sweep` end to end on the built-in world: a tiny IsoFLOP grid (2 budgets × 3 GPT-2 sizes) trained
for real, both fits and the report, then the same command again reusing every finished run.  About 2 minutes on
2 CPU cores (second acceptance lane: no pipeline)."""

from __future__ import annotations

import csv
import json
import math

from tests.conftest import ROOT, run_cli

BUDGETS = (1e10, 3e10)


def test_tiny_sweep_trains_fits_reports_and_reuses(tmp_path):
    run_dir = tmp_path / "sweep"
    args = ["scaling", "sweep", str(ROOT / "configs/scaling-world.yaml"), f"run_dir={run_dir}",
            f"pretrain={ROOT / 'configs/tiny-gpt2.yaml'}",
            "overrides=[model.vocab_size=512,model.max_seq_len=32,data.seq_len=32,data.world_bytes=3000000,"
            "tokenizer.train_bytes=1000000,train.global_batch_size=8,train.log_every=10,train.eval_max_batches=5]",
            f"budgets=[{BUDGETS[0]},{BUDGETS[1]}]",
            "sizes=[{d_model: 32, n_layer: 2, n_head: 2}, {d_model: 48, n_layer: 2, n_head: 3}, "
            "{d_model: 64, n_layer: 3, n_head: 4}]", "min_steps=5", "jobs=2", "bootstrap=20"]
    proc = run_cli(*args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(run_dir / "points.csv")))
    assert len(rows) == 6
    for r in rows:
        n, d, c, loss = float(r["N"]), float(r["D"]), float(r["C"]), float(r["loss"])
        assert r["n_params"] == "non_embedding" and int(r["N_total"]) > n
        step_flops = float(r["flops_per_token"]) * 8 * 32
        assert float(r["budget"]) - step_flops < c <= float(r["budget"])  # every run spends its budget
        assert loss < math.log(512)  # below a uniform guess: every run trained (the shortest has ~30 steps)
    best = {b: min(float(r["loss"]) for r in rows if float(r["budget"]) == b) for b in BUDGETS}
    assert best[BUDGETS[0]] < math.log(512) - 1.0
    assert best[BUDGETS[1]] < best[BUDGETS[0]]  # more compute, lower loss
    fitted = json.loads((run_dir / "fit.json").read_text())
    assert "approach3" in fitted and ("approach2" in fitted or "approach2_error" in fitted)
    assert fitted["approach3"]["intervals"]  # bootstrap intervals in the report
    report = (run_dir / "report.md").read_text()
    assert "tokens per parameter" in report and "![loss_vs_nd.png](loss_vs_nd.png)" in report
    for png in ("loss_vs_nd.png", "frontier.png"):
        assert (run_dir / png).stat().st_size > 1000
    # the same command again: every run reused, nothing retrained
    again = run_cli(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("(reused)") == 6
