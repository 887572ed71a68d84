"""Issue 28 on the gpt2 pipeline's reward and DPO stages, both trained from its SFT stage's model (the session's one
SFT model).  What holds is asserted; the per-kind bars the pipeline's model does not reach yet are one strict xfail
(the day they hold it fails and the mark goes; RESULTS.md, "Issue 28 calibration", has the measured table)."""

import json

import pytest
import torch

from lmforge.models.hf_task import load_task_model
from lmforge.objectives.reward import PairwiseRewardObjective
from lmforge.recipes.pairs import PairDataConfig, PairEncoder, load_pairs
from lmforge.data.chat import ChatFormat


@pytest.mark.parametrize("family", ["gpt2"])
def test_reward_model_loads_in_transformers_and_scores_alike(pipeline_run, family):
    transformers = pytest.importorskip("transformers")
    run_dir, summary = pipeline_run(family)
    model_dir = run_dir / "reward" / "model"
    scorer, tok = load_task_model(model_dir)
    scorer.eval()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    pairs = load_pairs(PairDataConfig())["test"][:8]
    encoder = PairEncoder(ChatFormat(tok), scorer.config.max_seq_len)
    examples = [e for e in (encoder.encode(p) for p in pairs) if e is not None]
    objective = PairwiseRewardObjective(pad_id=scorer.config.pad_token_id or 0)
    batch = objective.collate(examples)
    with torch.no_grad():
        ours = objective.scores(scorer, batch)
        for side, got in zip(("chosen", "rejected"), ours):
            ref = hf(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits[:, 0]
            torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2"])
def test_preference_stages_learn_tone_and_evasion(pipeline_run, family):
    run_dir, summary = pipeline_run(family)
    reward, dpo = summary["reward"]["test"], summary["dpo"]["test"]
    print("\nreward held-out accuracy:", {k: round(v["accuracy"], 3) for k, v in reward.items()},
          "\nDPO held-out accuracy:", {k: round(v["accuracy"], 3) for k, v in dpo.items()},
          "\ntone:", json.dumps(summary["dpo"]["tone"]))
    for kind in ("tone", "evasive"):  # pairs that differ only in a rude line, or answer vs evasion
        assert reward[kind]["accuracy"] >= 0.9 and dpo[kind]["accuracy"] >= 0.9, kind
    before, after = summary["dpo"]["tone"]["sft"], summary["dpo"]["tone"]["dpo"]
    assert before["rude_or_evasive"] >= 0.1  # the SFT model picked up the data's habit...
    assert after["rude_or_evasive"] <= before["rude_or_evasive"] / 2  # ...and DPO halves it (or better)
    report = (run_dir / "report.md").read_text()
    assert "![DPO curves](dpo/curves.png)" in report and "![reward model curves](reward/curves.png)" in report


# Not met by the pipeline's SFT model (RESULTS.md, "Issue 28 calibration"): pairs that differ only in correctness
# need a model that knows or can compute the right answer, and the SFT model's own exact match is low (issue 27's
# calibration bars are not met either): 0.65 (reward) and 0.55 (DPO) in the 2026-12-08 CI run.  DPO's exact match
# held there (0.19 -> 0.26, with RPO's NLL term; plain DPO lowered it in the calibration runs).
@pytest.mark.xfail(strict=True, reason="issue 28 per-kind bars not met by the pipeline's SFT model yet (RESULTS.md)")
@pytest.mark.parametrize("family", ["gpt2"])
def test_preference_stages_meet_every_per_kind_bar(pipeline_run, family):
    _, summary = pipeline_run(family)
    for test in (summary["reward"]["test"], summary["dpo"]["test"]):
        assert all(v["accuracy"] >= 0.9 for v in test.values())
    tone = summary["dpo"]["tone"]
    assert tone["dpo"]["exact_match"] >= tone["sft"]["exact_match"]
