"""EncoderDecoderLM (T5): config, meta build == eager build, KV-cached decoding == full decoding, shift_right,
activation checkpointing, autocast, and the seq2seq generation engine."""

from __future__ import annotations

import pytest
import torch

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.eval.generate import GenerationConfig
from lmforge.eval.generate_seq2seq import generate_seq2seq
from lmforge.models.encdec import EncoderDecoderLM
from lmforge.models.t5_layers import T5Config, relative_position_bucket

V = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(ff: str = "relu", **kw) -> T5Config:
    base = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj=ff)
    return T5Config(**{**base, **kw})


def model(ff: str = "relu", seed: int = 0, **kw) -> EncoderDecoderLM:
    torch.manual_seed(seed)
    return EncoderDecoderLM(tiny(ff, **kw)).eval()


def padded_inputs(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, V, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


# ---- config ------------------------------------------------------------------------------------------

def test_config_defaults_per_variant_and_yaml_errors():
    v10, v11 = tiny("relu"), tiny("gated-gelu")
    assert v10.tied and v10.scales_output and not v11.tied and not v11.scales_output
    assert tiny("gated-gelu", tie_word_embeddings=True).scales_output  # HF: scaling follows the tie by default
    assert tiny(scale_decoder_outputs=False).tied and not tiny(scale_decoder_outputs=False).scales_output
    assert v10.decoder_layers == 3 and tiny(num_decoder_layers=None).decoder_layers == 2
    assert v10.start_token_id == 0 and tiny(decoder_start_token_id=5).start_token_id == 5
    cfg = from_dict(T5Config, {"d_model": 64, "feed_forward_proj": "gated-gelu"})
    assert cfg.d_model == 64 and cfg.gated
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        from_dict(T5Config, {"feed_forward_proj": "gated-silu"})
    with pytest.raises(ConfigError, match="eos_token_id"):
        from_dict(T5Config, {"vocab_size": 8, "eos_token_id": 9})


# ---- construction --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_meta_build_equals_eager_build(ff):
    eager = model(ff, seed=3)
    torch.manual_seed(3)
    with torch.device("meta"):
        m = EncoderDecoderLM(tiny(ff))
    m.to_empty(device="cpu")
    m.reset_parameters()
    a, b = eager.state_dict(), m.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (m.lm_head.weight is m.shared.weight) == (ff == "relu")


def test_init_follows_hf_t5_scheme():
    c = T5Config(vocab_size=512, d_model=128, d_kv=32, d_ff=256, num_layers=1, num_heads=4, initializer_factor=2.0,
                 feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    m = EncoderDecoderLM(c)
    attn, ff = m.encoder.blocks[0].self_attn, m.encoder.blocks[0].ff
    expect = {m.shared.weight: 2.0, m.lm_head.weight: 2.0, attn.q.weight: 2.0 * (128 * 32) ** -0.5,
              attn.k.weight: 2.0 * 128 ** -0.5, attn.o.weight: 2.0 * 128 ** -0.5, ff.wi_0.weight: 2.0 * 128 ** -0.5,
              ff.wo.weight: 2.0 * 256 ** -0.5}
    for p, std in expect.items():
        assert abs(p.std().item() / std - 1) < 0.05
    assert torch.equal(attn.layer_norm.weight, torch.full((128,), 2.0))
    assert not hasattr(m.decoder.blocks[0].cross_attn, "relative_attention_bias")
    names = {n.rsplit(".", 1)[-1] for n, _ in m.named_modules()}
    assert {"q", "k", "v", "o", "wi_0", "wi_1", "wo", "layer_norm", "final_layer_norm",
            "relative_attention_bias", "lm_head", "shared"} <= names


def test_relative_buckets_bidirectional_and_causal():
    rel = torch.arange(-40, 41)
    bi = relative_position_bucket(rel, True, 32, 128)
    causal = relative_position_bucket(rel, False, 32, 128)
    assert bi[40] == 0 and bi[41] == 17 and bi[39] == 1  # distance 0; +1 in the upper half; -1 exact
    assert (causal[41:] == 0).all() and causal[39] == 1  # future keys share bucket 0
    assert bi.max() < 32 and causal.max() < 32


def test_shift_right():
    m = model()
    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    assert m.shift_right(labels).tolist() == [[0, 5, 6, 7], [0, 8, 0, 0]]


# ---- decoding with a cache -------------------------------------------------------------------------------

@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_cached_decoding_equals_full_decoding(ff):
    m = model(ff)
    ids, mask = padded_inputs([9, 5, 12])
    dec = torch.randint(3, V, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        enc = m.encode(ids, mask)
        full = m.logits(m.decode(dec, enc, mask))
        cache = m.new_cache(3, 10)
        steps = [m.logits(m.decode(dec[:, t:t + 1], enc, mask, cache=cache)) for t in range(4)]
        steps.append(m.logits(m.decode(dec[:, 4:7], None, mask, cache=cache)))  # several tokens after a past
        steps += [m.logits(m.decode(dec[:, t:t + 1], None, mask, cache=cache)) for t in range(7, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 10 and all(kv is not None for kv in cache.cross)


def test_padding_does_not_change_real_rows():
    m = model("gated-gelu")
    ids, mask = padded_inputs([7, 11])
    dec = torch.randint(3, V, (2, 5))
    with torch.no_grad():
        batch = m.logits(m(ids, mask, dec))
        alone = m.logits(m(ids[:1, :7], None, dec[:1]))
    torch.testing.assert_close(batch[:1], alone, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_same_gradients():
    grads = []
    ids, mask = padded_inputs([8, 6])
    dec = torch.randint(3, V, (2, 5))
    for ckpt in (False, True):
        m = model().train()
        m.set_activation_checkpointing(ckpt)
        m.logits(m(ids, mask, dec)).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_runs_and_dropout_trains():
    m = model(dropout=0.1)
    ids, mask = padded_inputs([6, 4])
    dec = torch.randint(3, V, (2, 4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.logits(m(ids, mask, dec))
    assert torch.isfinite(out).all()
    m.train()
    assert not torch.equal(m(ids, mask, dec), m(ids, mask, dec))


# ---- generation ------------------------------------------------------------------------------------------

def test_generate_batch_equals_one_at_a_time_and_finishes_on_eos():
    m = model("gated-gelu", seed=1)
    inputs = [[5, 9, 33, 1], [7, 12, 40, 41, 22, 8, 1], [60, 1]]
    cfg = GenerationConfig(max_new_tokens=12, eos_token_id=[])
    batch = generate_seq2seq(m, inputs, cfg)
    for x, r in zip(inputs, batch):
        alone = generate_seq2seq(m, [x], cfg)[0]
        assert r.tokens == alone.tokens and r.finish_reason == "length" and len(r.tokens) == 12
        assert r.prompt_tokens == len(x)
        torch.testing.assert_close(torch.tensor(r.raw_logprobs), torch.tensor(alone.raw_logprobs), rtol=1e-4,
                                   atol=1e-5)
    eos = batch[0].tokens[3]  # pretend the 4th token of row 0 is EOS
    res = generate_seq2seq(m, inputs, GenerationConfig(max_new_tokens=12, eos_token_id=eos))
    assert res[0].finish_reason == "eos" and res[0].tokens == batch[0].tokens[:batch[0].tokens.index(eos) + 1]


def test_sampling_is_reproducible_with_a_seed():
    m = model(seed=2)
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7, eos_token_id=[])
    a = generate_seq2seq(m, [[4, 5, 6, 1]], cfg)[0]
    b = generate_seq2seq(m, [[4, 5, 6, 1]], cfg)[0]
    assert a.tokens == b.tokens and len(a.tokens) == 10


class _CharTokenizer:
    """ids 3.. <-> characters; 1 = EOS."""

    eos_id = 1

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(ch) % (V - 3)) for ch in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + (i - 3) % 26) for i in ids if i >= 3)


def test_text_generation_appends_eos_and_honours_stop_strings():
    from lmforge.eval.generate_seq2seq import generate_seq2seq_text

    m, tok = model("gated-gelu", seed=1), _CharTokenizer()
    free = generate_seq2seq_text(m, tok, ["hello", "hi"], GenerationConfig(max_new_tokens=10, ignore_eos=True))
    ids = [tok.encode("hello") + [1], tok.encode("hi") + [1]]
    assert [r.tokens for r in free] == [r.tokens for r in generate_seq2seq(m, ids, GenerationConfig(max_new_tokens=10,
                                                                                                     ignore_eos=True))]
    assert free[0].text == tok.decode(free[0].tokens) and free[0].prompt_tokens == 6
    stop = free[0].text[2:4]
    res = generate_seq2seq_text(m, tok, ["hello"], GenerationConfig(max_new_tokens=10, ignore_eos=True, stop=[stop]))[0]
    assert res.finish_reason == "stop" and stop not in res.text and len(res.tokens) <= 4
