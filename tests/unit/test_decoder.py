"""Unit tests of lmforge.models: decoder construction/init, cache, losses, checkpointing, counts."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError, ModelError
from lmforge.models import (DecoderConfig, DecoderLM, KVCache, chunked_cross_entropy, config_params,
                            count_params, cross_entropy_sum, flops_per_token)
from lmforge.models.layers import Embedding, Linear

V = 160


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family: str = "gpt2", **kw) -> DecoderConfig:
    base = dict(family=family, vocab_size=V, d_model=64, n_layer=2, n_head=4, max_seq_len=64)
    if family == "llama":
        base["n_kv_head"] = 2
    return DecoderConfig(**{**base, **kw})


CONFIGS = [tiny("gpt2"), tiny("gpt2", tie_embeddings=False), tiny("llama"),
           tiny("llama", tie_embeddings=False, attention_bias=True, mlp_bias=True, pad_token_id=0)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.family}-tied{c.tie_embeddings}")
def test_meta_build_equals_eager_bitwise(cfg):
    torch.manual_seed(123)
    eager = DecoderLM(cfg)
    with torch.device("meta"):
        meta = DecoderLM(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(123)
    meta.reset_parameters()
    a, b = eager.state_dict(), meta.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (meta.lm_head.weight is meta.embed_tokens.weight) == cfg.tie_embeddings
    # reset_parameters is a pure function of the RNG state
    torch.manual_seed(123)
    eager.reset_parameters()
    for k, v in eager.state_dict().items():
        assert torch.equal(v, b[k]), k


def test_init_matches_transformers_scheme():
    torch.manual_seed(0)
    cfg = tiny("gpt2", n_layer=8, d_model=128, initializer_range=0.05)
    m = DecoderLM(cfg)
    for name, mod in m.named_modules():
        if isinstance(mod, Linear):
            want = 0.05 / math.sqrt(16) if name.endswith("c_proj") else 0.05
            assert mod.std == pytest.approx(want), name
            if mod.bias is not None:
                assert torch.count_nonzero(mod.bias) == 0
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    assert m.embed_tokens.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert m.blocks[0].attn.c_proj.weight.std().item() == pytest.approx(0.05 / 4, rel=0.1)
    llama = DecoderLM(tiny("llama", pad_token_id=3))
    assert torch.all(llama.embed_tokens.weight[3] == 0) and llama.embed_tokens.padding_idx == 3
    assert isinstance(llama.blocks[0].attn.q_proj, torch.nn.Linear)  # delta methods look for nn.Linear
    assert isinstance(llama.embed_tokens, (Embedding, torch.nn.Embedding))
    for mod in llama.modules():
        assert callable(getattr(mod, "reset_parameters", None)) or isinstance(mod, torch.nn.ModuleList)


def test_config_validation_and_yaml_section():
    with pytest.raises(ValueError, match="d_model=65 must be divisible by n_head=4"):
        tiny(d_model=65)
    with pytest.raises(ValueError, match="n_head=4 must be divisible by n_kv_head=3"):
        tiny("llama", n_kv_head=3)
    with pytest.raises(ValueError, match="grouped-query"):
        tiny("gpt2", n_kv_head=2)
    with pytest.raises(ValueError, match="gpt2 always has attention biases"):
        tiny("gpt2", attention_bias=False)
    with pytest.raises(ValueError, match="pad_token_id=200 is outside the vocabulary"):
        tiny(pad_token_id=200)
    cfg = from_dict(DecoderConfig, {"family": "llama", "d_model": 96, "n_head": 6, "n_kv_head": 2})
    assert cfg.ffn_dim == 256 and cfg.kv_heads == 2 and cfg.head_dim == 16
    assert tiny("gpt2").ffn_dim == 256
    with pytest.raises(ConfigError, match="config 'DecoderConfig'.*n_head"):
        from_dict(DecoderConfig, {"d_model": 100, "n_head": 3})
    with pytest.raises(ConfigError, match="unknown config key 'n_heads'"):
        from_dict(DecoderConfig, {"n_heads": 3})


def test_logits_shape_positions_and_mask_errors():
    torch.manual_seed(0)
    m = DecoderLM(tiny("gpt2")).eval()
    ids = torch.randint(0, V, (2, 7))
    h = m(ids)
    assert h.shape == (2, 7, 64) and m.logits(h).shape == (2, 7, V)
    # explicit positions = default positions; inputs_embeds = embedding lookup
    torch.testing.assert_close(m(ids, position_ids=torch.arange(7)[None].expand(2, 7)), h)
    torch.testing.assert_close(m(inputs_embeds=m.embed_tokens(ids)), h)
    # an all-ones mask takes the masked path but gives the same result as no mask
    torch.testing.assert_close(m(ids, attention_mask=torch.ones(2, 7)), h, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 6\).*\[2, 7\]"):
        m(ids, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        m(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cache_matches_full_forward_and_overflow(family):
    torch.manual_seed(0)
    m = DecoderLM(tiny(family)).eval()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        full = m.logits(m(ids))
        cache = m.new_cache(2, max_len=10)
        assert isinstance(cache, KVCache) and cache.k[0].shape == (2, m.config.kv_heads, 10, 16)
        out = [m.logits(m(ids[:, :6], cache=cache))]
        out += [m.logits(m(ids[:, t:t + 1], cache=cache)) for t in range(6, 10)]
        torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-5, atol=1e-5)
        with pytest.raises(ModelError, match="KV cache overflow: 11 positions > max_len 10"):
            m(ids[:, :1], cache=cache)
        with pytest.raises(ValueError):  # also a ValueError, for callers that catch that
            m(ids[:, :1], cache=cache)


def test_chunked_cross_entropy_equals_plain():
    torch.manual_seed(0)
    B, T, d = 3, 11, 32
    for bias in (False, True):
        head = torch.nn.Linear(d, V, bias=bias)
        hidden = torch.randn(B, T, d, requires_grad=True)
        labels = torch.randint(0, V, (B, T))
        labels[0, :4] = -100
        labels[2, -1] = -100
        ref_loss, ref_n = cross_entropy_sum(head(hidden), labels)
        ref_loss.backward()
        ref = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
        for chunk in (None, 1, 5, 64):
            hidden.grad = None
            head.zero_grad(set_to_none=True)
            loss, n = chunked_cross_entropy(hidden, head, labels, chunk_size=chunk)
            assert n.item() == ref_n.item() == B * T - 5
            torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
            (loss * 0.5).backward()
            got = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, 0.5 * r, rtol=0, atol=1e-6)
    # frozen head, no grad mode, all targets ignored
    head.requires_grad_(False)
    head.zero_grad(set_to_none=True)
    hidden.grad = None
    loss, _ = chunked_cross_entropy(hidden, head, labels, chunk_size=4)
    loss.backward()
    assert hidden.grad is not None and head.weight.grad is None
    with torch.no_grad():
        loss2, _ = chunked_cross_entropy(hidden, head, labels)
    torch.testing.assert_close(loss2, loss.detach())
    loss, n = chunked_cross_entropy(hidden, head, torch.full((B, T), -100))
    assert loss.item() == 0.0 and n.item() == 0


def test_chunked_cross_entropy_through_tied_model():
    torch.manual_seed(0)
    cfg = tiny("llama")
    a = DecoderLM(cfg)
    b = DecoderLM(cfg)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, V, (2, 9))
    labels = torch.roll(ids, -1, 1)
    la, _ = cross_entropy_sum(a.logits(a(ids)), labels)
    lb, _ = chunked_cross_entropy(b(ids), b.lm_head, labels, chunk_size=7)
    la.backward()
    lb.backward()
    torch.testing.assert_close(lb, la)
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_checkpointing_same_grads_with_frozen_embeddings(family):
    torch.manual_seed(0)
    cfg = tiny(family, dropout=0.1)
    ref = DecoderLM(cfg).train()
    ck = DecoderLM(cfg).train()
    ck.load_state_dict(ref.state_dict())
    ck.set_activation_checkpointing(True)
    for m in (ref, ck):
        m.embed_tokens.weight.requires_grad_(False)  # input to the blocks has requires_grad False
        if m.embed_positions is not None:
            m.embed_positions.weight.requires_grad_(False)
    ids = torch.randint(0, V, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    grads = []
    for m in (ref, ck):
        torch.manual_seed(7)  # same dropout masks (checkpoint replays the RNG state)
        loss, n = chunked_cross_entropy(m(ids, attention_mask=mask), m.lm_head, ids)
        loss.backward()
        grads.append({k: p.grad for k, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for k in grads[0]:
        assert grads[1][k] is not None, k
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_param_and_flop_counts_gpt2_small():
    gpt2_small = DecoderConfig(family="gpt2", vocab_size=50257, d_model=768, n_layer=12, n_head=12,
                               max_seq_len=1024)
    assert config_params(gpt2_small, non_embedding=False) == 124_439_808  # HF's gpt2 parameter count
    n = config_params(gpt2_small)
    assert n == 124_439_808 - 1024 * 768  # positions out, tied token matrix counted once as the head
    with torch.device("meta"):
        m = DecoderLM(gpt2_small)
    assert count_params(m) == n and count_params(m, non_embedding=False) == 124_439_808
    assert flops_per_token(gpt2_small, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(gpt2_small) == flops_per_token(gpt2_small, 1024)


@pytest.mark.parametrize("cfg", CONFIGS + [tiny("llama", qkv_bias=True, n_kv_head=1)],
                         ids=lambda c: f"{c.family}-tied{c.tie_embeddings}")
def test_config_params_match_built_model(cfg):
    with torch.device("meta"):
        m = DecoderLM(cfg)
    assert count_params(m) == config_params(cfg)
    assert count_params(m, non_embedding=False) == config_params(cfg, non_embedding=False)
    emb = V * 64 + (64 * 64 if cfg.family == "gpt2" else 0)
    head = V * 64
    assert config_params(cfg, non_embedding=False) - config_params(cfg) == emb - (head if cfg.tie_embeddings else 0)
    m.embed_tokens.weight.requires_grad_(False)
    assert count_params(m, non_embedding=False, trainable_only=True) == \
        count_params(m, non_embedding=False) - V * 64


def test_kv_cache_reorder_and_reset():
    c = KVCache(n_layers=1, batch_size=3, n_kv_heads=1, head_dim=2, max_len=4)
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    c.update(0, k, k)
    c.advance(2)
    c.reorder(torch.tensor([2, 0]))
    assert c.batch_size == 2 and c.k[0][:, 0, 0, 0].tolist() == [2.0, 0.0]
    c.reset()
    assert c.length == 0


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 65])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_few_rows_path_equals_f_linear(rows, bias):
    """Decoding's ``(W @ x^T)^T`` product (one row computed as two) gives F.linear's values, in inference mode
    only; training and no_grad keep F.linear itself, bitwise."""
    import torch.nn.functional as F

    from lmforge.models.layers import few_rows_linear

    torch.manual_seed(rows)
    lin = Linear(48, 80, bias=bias)
    x = torch.randn(1, rows, 48)
    want = F.linear(x, lin.weight, lin.bias)
    for threads in (1, 2):  # one row takes a different product with one thread
        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = few_rows_linear(x, lin.weight, lin.bias)
        finally:
            torch.set_num_threads(n)
        assert got.shape == want.shape == (1, rows, 80) and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(lin(x), want)
    assert torch.equal(lin(x), want)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.family}-tied{c.tie_embeddings}")
def test_real_tokens_only_equals_the_padded_pass(cfg, checkpointing):
    """``real_tokens``: the token-wise layers skip padding; real positions and every gradient are unchanged, the
    skipped positions are zeros (right and left padding; a row with no padding)."""
    torch.manual_seed(0)
    model = DecoderLM(cfg).train()
    model.activation_checkpointing = checkpointing
    ids = torch.randint(1, V, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 7:] = 0  # right padded
    mask[1, :5] = 0  # left padded
    mask[3, 2:] = 0
    real = mask.bool()
    full = model(ids, attention_mask=mask)
    only = model(ids, attention_mask=mask, real_tokens=mask)
    assert torch.equal(only[~real], torch.zeros_like(only[~real]))
    torch.testing.assert_close(only[real], full[real], rtol=0, atol=1e-6)
    weights = torch.randn_like(full[real])
    g_full = torch.autograd.grad((full[real] * weights).sum(), list(model.parameters()), allow_unused=True)
    g_only = torch.autograd.grad((only[real] * weights).sum(), list(model.parameters()), allow_unused=True)
    for name, a, b in zip([n for n, _ in model.named_parameters()], g_full, g_only):
        if a is None:
            assert b is None, name
            continue
        # summed over tokens in another order: equal to fp32 rounding of the largest entry
        assert (b - a).abs().max() <= 1e-6 * a.abs().max() + 1e-7, name
