"""Generation on a model being trained under 2-rank gloo DDP and FSDP2 equals the single-process engine (issue 24).

tests/dist_worker.py ``generate``: each rank generates for prompts of its own before the first step (greedy and
sampled) and after two steps (greedy); here the same prompts go through the 1-process engine on the same weights.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.eval.generate import generate
from lmforge.eval.sampling import GenerationConfig, SamplingRNG, completion_batch
from lmforge.objectives.logprobs import token_logprobs
from tests.unit.test_distributed import W, check_ok, rel_weight_diff, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")
STRATEGIES = ("ddp", "fsdp")
RANKS = (0, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-generate")
    check_ok(torchrun(2, "generate", str(out)))
    found = {(s, r): torch.load(out / f"{s}-rank{r}.pt", weights_only=False) for s in STRATEGIES for r in RANKS}
    reference = W.make_trainer(out / "one-process", None, None, max_steps=2)
    reference.fit()
    return found, reference.export_model().state_dict()


def one_process(weights, prompts, cfg, **kw):
    model = W.make_model()
    if weights is not None:
        model.load_state_dict(weights)
    return model, generate(model, prompts, cfg, num_samples=2, **kw)


GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0, eos_token_id=7)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("when", ["before", "after"])
def test_greedy_equals_the_single_process_engine(runs, strategy, rank, when):
    found, _ = runs
    weights = found[(strategy, 0)]["weights"] if when == "after" else None
    prompts = W.ROLLOUT_PROMPTS[rank]
    model, expected = one_process(weights, prompts, GREEDY)
    got = found[(strategy, rank)]["results"][when]
    assert [r["tokens"] for r in got] == [r.tokens for r in expected]
    assert [r["finish_reason"] for r in got] == [r.finish_reason for r in expected]
    # the distributed engine's log-probs are what a teacher-forced pass of the helper gives (fp32, 1e-5 per token)
    batch = completion_batch(prompts, expected, pad_id=0, num_samples=2)
    with torch.no_grad():
        forced = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["score_mask"])
    for i, r in enumerate(got):
        torch.testing.assert_close(forced.logprobs[i][batch["score_mask"][i]], torch.tensor(r["logprobs"]),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sampled_equals_the_single_process_engine(runs, strategy, rank):
    found, _ = runs
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0)
    _, expected = one_process(None, W.ROLLOUT_PROMPTS[rank], cfg,
                              generator=SamplingRNG(seed=4, rank=rank).generator())
    assert [r["tokens"] for r in found[(strategy, rank)]["results"]["sampled"]] == [r.tokens for r in expected]


def test_ranks_generated_for_their_own_prompts(runs):
    found, _ = runs
    for strategy in STRATEGIES:
        lengths = [[r["prompt_tokens"] for r in found[(strategy, rank)]["results"]["after"]] for rank in RANKS]
        assert lengths == [[len(p) for p in W.ROLLOUT_PROMPTS[rank] for _ in (0, 1)] for rank in RANKS]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_after_generation_equals_training_without_it(runs, strategy):
    """Generating (and, under FSDP, gathering and resharding every unit -- before the root's first forward, too)
    leaves training as it was: two steps end at the 1-process weights."""
    found, reference = runs
    diffs = rel_weight_diff(found[(strategy, 0)]["weights"], reference)
    assert max(diffs.values()) <= 1e-4, diffs
