"""Generation engine: logits processors, stop strings, EOS, log-probs, seeded sampling, streaming."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.eval.generate import (
    GenerationConfig,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    generate_text,
    process_logits,
)

# --------------------------------------------------------------------------------------------------
# Logits processors
# --------------------------------------------------------------------------------------------------


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 2.0, 1.0]])
    out = apply_top_k(logits, 2)
    inf = float("-inf")
    assert out[0].tolist() == [inf, 5.0, inf, 4.0, inf]
    assert out[1].tolist() == [inf, inf, 2.0, 2.0, inf]
    assert torch.equal(apply_top_k(logits, 0), logits)
    assert torch.equal(apply_top_k(logits, 5), logits)


def test_top_p_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(apply_top_p(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert kept(0.75) == [False, True, False, True]  # 0.5 + 0.3
    assert kept(0.9) == [False, True, True, True]  # 0.5 + 0.3 + 0.15
    assert kept(1.0) == [True] * 4
    assert kept(1e-6) == [False, True, False, False]  # the most likely token always survives


def test_repetition_penalty_ctrl_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.allclose(process_logits(logits, GenerationConfig(temperature=0.5)), logits / 0.5)
    assert torch.equal(process_logits(logits, GenerationConfig(temperature=0.0)), logits)


def test_processors_match_transformers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    scores = torch.randn(4, 50) * 3
    input_ids = torch.randint(0, 50, (4, 7))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, input_ids, True)
    ours = process_logits(scores, GenerationConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3),
                          seen)
    ref = lp.RepetitionPenaltyLogitsProcessor(1.3)(input_ids, scores.clone())
    ref = lp.TemperatureLogitsWarper(0.7)(input_ids, ref)
    ref = lp.TopKLogitsWarper(20)(input_ids, ref)
    ref = lp.TopPLogitsWarper(0.8)(input_ids, ref)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(ours[fin], ref[fin])


def test_config_validation():
    with pytest.raises(ConfigError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ConfigError, match="stop"):
        GenerationConfig(stop=[""])
    assert GenerationConfig(stop="\n").stop == ["\n"]
