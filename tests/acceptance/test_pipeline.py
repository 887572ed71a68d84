"""The README's main job: `lmforge pipeline` on the built-in world, offline, on CPU.

Acceptance bar: validation perplexity <= 0.1 x the unigram perplexity of the same validation text, and a
report.md with curves and samples whose links resolve, whose curves hold every logged point and whose reproduce
command prints its perplexity again.  The wall time is printed (and recorded in the report), not asserted."""

import pytest

from tests.report_checks import assert_curves_hold_every_point, assert_links_resolve, assert_perplexity_reproduces


@pytest.mark.parametrize("family", ["gpt2"])
def test_pipeline_end_to_end(pipeline_run, family):
    run_dir, summary = pipeline_run(family)
    print(f"\npipeline wall time {summary['wall_s']:.0f} s; val ppl {summary['val_perplexity']:.3f}, "
          f"unigram {summary['unigram_perplexity']:.1f}, ratio {summary['ratio_to_unigram']:.4f}")
    assert summary["ratio_to_unigram"] <= 0.1
    report = (run_dir / "report.md").read_text()
    assert "![loss and validation perplexity](curves.png)" in report
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert "## Samples" in report and "```text" in report
    assert "unigram" in report and "wall time" in report
    assert (run_dir / "model" / "model.safetensors").exists()
    # the fine-tuning stage: the pretrained decoder on world sentiment, beside its baselines
    ft = summary["finetune"]
    print(f"fine-tuned world-sentiment test accuracy {ft['test']['accuracy']:.3f} "
          f"(bag of words {ft['baselines']['bag_of_words']['accuracy']:.3f})")
    assert ft["task"] == "world-sentiment" and ft["test"]["accuracy"] >= 0.95
    assert "## Fine-tuning" in report and "bag of words" in report
    assert (run_dir / "finetune" / "model" / "config.json").is_file()
    # the report without gaps, on the real run (no extra training: one eval perplexity of the validation file)
    assert (run_dir / "finetune" / "report.md").resolve() in assert_links_resolve(run_dir / "report.md")
    assert_curves_hold_every_point(run_dir, "validation perplexity")
    assert_curves_hold_every_point(run_dir / "finetune", "val_accuracy")
    assert_perplexity_reproduces(run_dir, window=128, stride=64)
