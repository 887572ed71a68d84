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


# --------------------------------------------------------------------------------------------------
# The engine on a small random decoder
# --------------------------------------------------------------------------------------------------

CORPUS = [
    "The river Olm runs past the mill of Tarsk, where the miller Edda grinds barley every autumn.",
    "Edda has three sons; the eldest, Bran, keeps bees on the hill above the village.",
    "A ferry costs two copper coins; children and goats cross for free on market days.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from lmforge.core.tokenizer import Tokenizer

    return Tokenizer.train(CORPUS * 4, vocab_size=320)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    from lmforge.models.decoder import DecoderLM
    from lmforge.models.decoder_config import DecoderConfig

    torch.manual_seed(0)
    cfg = DecoderConfig(family=request.param, vocab_size=320, d_model=64, n_layer=2, n_head=4,
                        n_kv_head=2 if request.param == "llama" else None, max_seq_len=128,
                        tie_embeddings=request.param == "gpt2")
    m = DecoderLM(cfg)
    with torch.no_grad():  # confident, varied next-token distributions
        for p in m.parameters():
            if p.ndim >= 2:
                p.mul_(6.0)
    return m.eval()


PROMPTS = [[5, 9, 200, 31], [7], [100, 101, 102, 103, 104, 105, 106]]


def _full_logprobs(model, prompt, tokens):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model.logits(model(ids))[0].float()
    return logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)]


def test_raw_logprobs_equal_full_forward(model):
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=1)
    for prompt, res in zip(PROMPTS, generate(model, PROMPTS, cfg)):
        assert len(res.tokens) == len(res.logprobs) == len(res.raw_logprobs) == 12
        logits = _full_logprobs(model, prompt, res.tokens)
        idx = torch.arange(len(res.tokens))
        tok = torch.tensor(res.tokens)
        raw = torch.log_softmax(logits, -1)[idx, tok]
        torch.testing.assert_close(torch.tensor(res.raw_logprobs), raw, rtol=1e-4, atol=1e-4)
        # logprobs: the distribution actually sampled from (temperature, top-k, top-p applied)
        proc = process_logits(logits, cfg)
        samp = torch.log_softmax(proc, -1)[idx, tok]
        torch.testing.assert_close(torch.tensor(res.logprobs), samp, rtol=1e-4, atol=1e-4)
        assert all(math.isfinite(x) for x in res.logprobs)


def test_greedy_logprobs_are_model_logprobs(model):
    res = generate(model, PROMPTS[:1], GenerationConfig(max_new_tokens=8))[0]
    assert res.logprobs == res.raw_logprobs
    logits = _full_logprobs(model, PROMPTS[0], res.tokens)
    assert res.tokens == logits.argmax(-1).tolist()


def test_seeded_sampling_reproducible(model):
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, seed=123)
    a = generate(model, PROMPTS, cfg)
    b = generate(model, PROMPTS, cfg)
    c = generate(model, PROMPTS, GenerationConfig(max_new_tokens=16, temperature=1.0, seed=124))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_repetition_penalty_reduces_repeats(model):
    prompt = [[5, 9, 200, 31]]
    plain = generate(model, prompt, GenerationConfig(max_new_tokens=24))[0].tokens
    pen = generate(model, prompt, GenerationConfig(max_new_tokens=24, repetition_penalty=1e4))[0].tokens
    # With an enormous penalty no token of the prompt or of the output is ever chosen twice (logits > 0
    # collapse towards 0, negative ones explode); plain greedy decoding of this model repeats itself.
    assert len(set(pen)) == len(pen) and not set(pen) & set(prompt[0])
    assert len(set(plain)) < len(plain)


def test_eos_finishes_row(model):
    ref = generate(model, PROMPTS, GenerationConfig(max_new_tokens=20))
    eos = ref[0].tokens[4]
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=20, eos_token_id=eos))
    for r, o in zip(ref, out):
        if eos in r.tokens:
            k = r.tokens.index(eos) + 1
            assert o.tokens == r.tokens[:k] and o.finish_reason == "eos"
            assert len(o.logprobs) == len(o.raw_logprobs) == k
        else:
            assert o.tokens == r.tokens and o.finish_reason == "length"
    # min_new_tokens forbids EOS early; ignore_eos never finishes on it
    late = generate(model, PROMPTS[:1], GenerationConfig(max_new_tokens=20, eos_token_id=eos, min_new_tokens=6))[0]
    assert eos not in late.tokens[:6]
    never = generate(model, PROMPTS[:1], GenerationConfig(max_new_tokens=20, eos_token_id=eos, ignore_eos=True))[0]
    assert never.tokens == ref[0].tokens and never.finish_reason == "length"


def test_stop_strings(model, tokenizer):
    prompts = [tokenizer.encode(p) for p in ("The river", "Edda has", "A")]
    ref = generate(model, prompts, GenerationConfig(max_new_tokens=24), tokenizer=tokenizer)
    assert ref[0].text and len(ref[0].text) > 8
    stop = ref[0].text[4:7]
    out = generate(model, prompts, GenerationConfig(max_new_tokens=24, stop=[stop, "\x00never"]), tokenizer=tokenizer)
    for r, o in zip(ref, out):
        if stop in r.text:
            assert o.finish_reason == "stop"
            assert o.text == r.text[: r.text.index(stop)]
            assert o.tokens == r.tokens[: len(o.tokens)]  # a prefix, ending at the token that completed it
            assert stop in tokenizer.decode(o.tokens) and stop not in tokenizer.decode(o.tokens[:-1])
        else:
            assert o.finish_reason == "length" and o.tokens == r.tokens
    assert out[0].finish_reason == "stop"
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, prompts, GenerationConfig(stop=["x"]))


def test_streaming(model, tokenizer):
    seen: list[tuple[int, int]] = []
    cfg = GenerationConfig(max_new_tokens=10)
    res = generate(model, PROMPTS, cfg, stream=lambda row, tok: seen.append((row, tok)))
    for i, r in enumerate(res):
        assert [t for row, t in seen if row == i] == r.tokens
    buf = io.StringIO()
    out = generate_text(model, tokenizer, "The river", GenerationConfig(max_new_tokens=16), stream_to=buf)
    assert buf.getvalue() == out[0].text


def test_text_level_and_edge_cases(model, tokenizer):
    out = generate_text(model, tokenizer, ["The river", "A"], GenerationConfig(max_new_tokens=5))
    assert all(r.text == tokenizer.decode(r.tokens, skip_special_tokens=True) for r in out)
    assert generate(model, [], GenerationConfig()) == []
    empty = generate(model, PROMPTS, GenerationConfig(max_new_tokens=0))
    assert all(r.tokens == [] and r.finish_reason == "length" for r in empty)
    with pytest.raises(ConfigError, match="empty"):
        generate(model, [[]], GenerationConfig())
    with pytest.raises(ConfigError, match="context"):
        generate(model, PROMPTS, GenerationConfig(max_new_tokens=200))
    model.train()
    generate(model, PROMPTS, GenerationConfig(max_new_tokens=2))
    assert model.training  # the training flag is restored
    model.eval()
