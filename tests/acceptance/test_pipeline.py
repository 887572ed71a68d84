"""The README's main job: `lmforge pipeline` on the built-in world, offline, on CPU.

Acceptance bar: validation perplexity <= 0.1 x the unigram perplexity of the same validation text, and a
report.md with curves and samples.  The wall time is printed (and recorded in the report), not asserted."""

import json

from tests.conftest import run_cli


def test_pipeline_end_to_end(tmp_path):
    run_dir = tmp_path / "pipeline"
    proc = run_cli("pipeline", f"run_dir={run_dir}", timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\npipeline wall time {summary['wall_s']:.0f} s; val ppl {summary['val_perplexity']:.3f}, "
          f"unigram {summary['unigram_perplexity']:.1f}, ratio {summary['ratio_to_unigram']:.4f}")
    assert summary["ratio_to_unigram"] <= 0.1
    report = (run_dir / "report.md").read_text()
    assert "![loss and validation perplexity](curves.png)" in report
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert "## Samples" in report and "```text" in report
    assert "unigram" in report and "wall time" in report
    assert (run_dir / "model" / "model.safetensors").exists()
