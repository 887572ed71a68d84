"""The log-prob helper against a direct log_softmax/gather on full logits (issue 24, item 2)."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.objectives.logprobs import head_logprobs, sequence_logprobs, token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")
V = 61

FLAVOURS = {  # every decoder flavour lmforge builds: GPT-2, Llama (GQA, untied), Qwen2 (qkv bias), biased Llama
    "gpt2": dict(family="gpt2"),
    "llama": dict(family="llama", n_kv_head=2, tie_embeddings=False),
    "qwen2": dict(family="llama", n_kv_head=2, qkv_bias=True),
    "llama_bias": dict(family="llama", attention_bias=True),
}


def model_of(flavour: str) -> DecoderLM:
    torch.manual_seed(0)
    m = DecoderLM(DecoderConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=32,
                                eos_token_id=2, pad_token_id=0, **FLAVOURS[flavour]))
    return m.eval()


def batch(padding: str):
    """Three rows of lengths 9, 5, 7 padded to 9 on the given side, with a score mask on each row's tail."""
    g = torch.Generator().manual_seed(1)
    lengths = [9, 5, 7]
    ids = torch.zeros((3, 9), dtype=torch.long)
    attn = torch.zeros((3, 9), dtype=torch.long)
    score = torch.zeros((3, 9), dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(0, n) if padding == "right" else slice(9 - n, 9)
        ids[i, cols] = torch.randint(3, V, (n,), generator=g)
        attn[i, cols] = 1
        tail = torch.zeros(n, dtype=torch.long)
        tail[2:] = 1  # a 2-token "prompt", then the scored completion
        score[i, cols] = tail
    return ids, attn, score


def direct(model, ids, attn, score, temperature):
    """The reference: full fp64 logits, log_softmax, gather; each row scored alone without padding."""
    out = torch.zeros(ids.shape, dtype=torch.float64)
    for i in range(ids.shape[0]):
        cols = attn[i].bool()
        row = ids[i, cols][None]
        logits = model.lm_head(model(row)).double() / temperature
        lsm = torch.log_softmax(logits[0, :-1], -1).gather(1, row[0, 1:, None]).squeeze(1)
        full = torch.zeros(row.shape[1], dtype=torch.float64)
        full[1:] = lsm
        out[i, cols] = full * score[i, cols]
    return out


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_a_direct_log_softmax(flavour, padding, temperature):
    model = model_of(flavour)
    ids, attn, score = batch(padding)
    with torch.no_grad():
        got = token_logprobs(model, ids, attn, score, temperature=temperature, entropy=True, chunk_size=5)
        ref = direct(model, ids, attn, score, temperature)
    assert torch.equal(got.mask, (score.bool() & attn.bool()) & (torch.arange(9) > 0))
    torch.testing.assert_close(got.logprobs.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.sums.double(), ref.sum(-1), rtol=1e-6, atol=0)
    assert got.counts.tolist() == [7, 3, 5]
    assert torch.all(got.entropy[got.mask] > 0) and torch.all(got.entropy[~got.mask] == 0)
    sums, counts = sequence_logprobs(model, ids, attn, score, temperature=temperature)
    torch.testing.assert_close(sums, got.sums, rtol=0, atol=0)


def test_entropy_is_that_of_the_tempered_distribution():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, V)
    h = torch.randn(6, 8)
    y = torch.randint(0, V, (6,))
    _, ent = head_logprobs(h, head, y, temperature=1.5, entropy=True, chunk_size=4)
    p = torch.softmax(head(h).double() / 1.5, -1)
    torch.testing.assert_close(ent.double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_equal_those_of_the_direct_computation(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, V, bias=bias)
    h = torch.randn(7, 8, requires_grad=True)
    y = torch.randint(0, V, (7,))
    w = torch.randn(7)  # an upstream gradient that differs per row, as DPO's and PPO's do
    logp, _ = head_logprobs(h, head, y, temperature=0.8, chunk_size=3)
    (logp * w).sum().backward()
    got = [h.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    h.grad = None
    head.zero_grad()
    ref = torch.log_softmax(head(h) / 0.8, -1).gather(1, y[:, None]).squeeze(1)
    (ref * w).sum().backward()
    want = [h.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_training_model_gets_gradients_through_token_logprobs():
    model = model_of("llama")
    ids, attn, score = batch("left")
    token_logprobs(model, ids, attn, score).sums.sum().backward()
    assert model.lm_head.weight.grad is not None and model.embed_tokens.weight.grad.abs().sum() > 0


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        head_logprobs(torch.zeros(1, 8), torch.nn.Linear(8, V), torch.zeros(1, dtype=torch.long), temperature=0)
