"""Issue 27's calibration on the gpt2 pipeline's SFT stage (its session-scoped SFT model, which the reward, DPO and
RL checks reuse).  The issue's bars: in-context task types on held-out entities reach exact match >= 0.8 on average
and >= the pretrained model's few-shot + 0.4; held-out phrasings >= 0.7.  Closed-book and held-out task types are
reported beside the base model's numbers, not barred (FLAN: below ~8B parameters instruction tuning can hurt unseen
tasks)."""

import json
import re
import shlex

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize("family", ["gpt2"])
def test_sft_stage_writes_the_model_later_stages_use_and_an_honest_table(pipeline_run, family):
    run_dir, summary = pipeline_run(family)
    sft = summary["sft"]
    em = sft["eval"]
    print("\nSFT stage exact match (split/kind/column):\n" + "\n".join(f"  {k}: {v}" for k, v in em.items()))
    assert sft["model"] == str(run_dir / "sft" / "model")
    assert (run_dir / "sft" / "model" / "model.safetensors").is_file()
    assert json.loads((run_dir / "sft" / "model" / "tokenizer_config.json").read_text())["chat_template"]
    # instruction tuning taught the format: the SFT model beats its base zero- and few-shot on the seen types
    seen = em["test_entities/in_context/sft"] + em["test_entities/closed_book/sft"]
    assert seen > em["test_entities/in_context/base_few"] + em["test_entities/closed_book/base_few"] + 0.2
    # closed-book and held-out types: reported beside the base model, whatever they show
    for key in ("test_entities/closed_book", "test_types/in_context", "test_types/closed_book"):
        assert {f"{key}/{c}" for c in ("sft", "base_zero", "base_few")} <= set(em)
    for key in ("test_entities/closed_book", "test_types/closed_book"):  # and by likelihood for closed-book types
        assert 0.0 <= em[f"{key}/base_likelihood"] <= 1.0
    report = (run_dir / "report.md").read_text()
    assert "## SFT (instruction tuning)" in report and "FLAN" in report and "### Chat samples" in report
    assert "![SFT loss](sft/curves.png)" in report


# Not met by the pipeline's pretrained model at the SFT stage's budget (RESULTS.md, "Issue 27 calibration"): the
# 400-step pretrained model cannot copy a name from its prompt (its base replies to "X is a miller of the Y family.
# X is a miller of the" do not continue with Y), and 250-300 SFT steps do not teach it to, so the copying types
# (extract, replace, sort, position, follow_up) stay near 0.  strict: the day the bars are met this fails, and the
# mark goes.
@pytest.mark.xfail(strict=True, reason="issue 27 calibration bars not met by the pipeline's model yet (RESULTS.md)")
@pytest.mark.parametrize("family", ["gpt2"])
def test_sft_stage_meets_the_calibration_bars(pipeline_run, family):
    _, summary = pipeline_run(family)
    em = summary["sft"]["eval"]
    seen = em["test_entities/in_context/sft"]
    assert seen >= 0.8 and seen >= em["test_entities/in_context/base_few"] + 0.4
    assert em["test_phrasings/in_context/sft"] >= 0.7


@pytest.mark.parametrize("family", ["gpt2"])
def test_eval_instructions_reproduces_the_reports_line(pipeline_run, family):
    """The report's `lmforge eval instructions` command prints the report's held-out-entities line."""
    run_dir, _ = pipeline_run(family)
    section = (run_dir / "report.md").read_text()
    section = section[section.index("## Reproducing the numbers"):]
    cmd, printed = re.search(r"```sh\n(lmforge eval instructions [^\n]+)\n```\nprints `([^`]+)`", section).groups()
    proc = run_cli(*shlex.split(cmd)[1:], timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert printed in proc.stdout.splitlines()
