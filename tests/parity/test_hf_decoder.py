"""Parity of lmforge's decoder LMs with transformers (the reference), both directions, fp32."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.core.errors import ModelError  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.hf import load_config  # noqa: E402
from lmforge.models.io import load_model, save_model  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 256
MAX_ABS_DIFF: dict[str, float] = {}


def _hf_model(kind: str):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, attn_implementation="eager")
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                         attn_implementation="eager")
        cls = GPT2LMHeadModel
    elif kind == "llama_gqa_tied":
        cfg, cls = LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True,
                               rope_parameters={"rope_type": "default", "rope_theta": 500.0}), LlamaForCausalLM
    elif kind == "llama_bias_untied":
        cfg, cls = LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=False, attention_bias=True,
                               mlp_bias=True), LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False), Qwen2ForCausalLM
    elif kind == "mistral":
        cfg, cls = MistralConfig(**common, num_key_value_heads=2, sliding_window=None), MistralForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    _perturb(model)
    return model


def _perturb(model: torch.nn.Module) -> None:
    """Random norms and biases (HF inits them to 1 and 0) and larger weights, so every parameter matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def _record(key: str, a: torch.Tensor, b: torch.Tensor) -> None:
    MAX_ABS_DIFF[key] = max(MAX_ABS_DIFF.get(key, 0.0), (a - b).abs().max().item())


def _left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask, prompts


KINDS = ["gpt2", "llama_gqa_tied", "llama_bias_untied", "qwen2", "mistral"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    hf = _hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    model, tok = load_model(d)
    assert tok is None
    return request.param, hf, model


def test_full_forward(pair):
    kind, hf, model = pair
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model.logits(model(ids))
    _record(kind + " full", out, ref)
    torch.testing.assert_close(out, ref, **TOL)


def test_left_padding(pair):
    kind, hf, model = pair
    ids, mask, prompts = _left_padded([13, 7, 2, 13])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        out = model.logits(model(ids, attention_mask=mask))
        real = mask.bool()
        _record(kind + " padded", out[real], ref[real])
        torch.testing.assert_close(out[real], ref[real], **TOL)
        for i, p in enumerate(prompts):  # each prompt alone, unpadded
            alone = model.logits(model(p[None]))[0]
            _record(kind + " padded-vs-alone", out[i, -len(p):], alone)
            torch.testing.assert_close(out[i, -len(p):], alone, **TOL)


def test_kv_cache_decode(pair):
    kind, hf, model = pair
    ids, mask, _ = _left_padded([12, 5, 9], seed=3)
    T = ids.shape[1]
    with torch.no_grad():
        full = model.logits(model(ids, attention_mask=mask))
        cache = model.new_cache(batch_size=3, max_len=T)
        prefill = 4
        steps = [model.logits(model(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache))]
        for t in range(prefill, T):
            steps.append(model.logits(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache)))
        assert cache.length == T
        inc = torch.cat(steps, dim=1)
        real = mask.bool()
        _record(kind + " cache", inc[real], full[real])
        torch.testing.assert_close(inc[real], full[real], **TOL)
        # Unpadded batch, no mask: prefill several tokens, then single tokens, then a 2-token chunk.
        ids2 = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
        full2 = hf(ids2).logits
        cache = model.new_cache(batch_size=2, max_len=16)
        parts = [model.logits(model(ids2[:, :5], cache=cache))]
        parts += [model.logits(model(ids2[:, t:t + 1], cache=cache)) for t in range(5, 9)]
        parts.append(model.logits(model(ids2[:, 9:], cache=cache)))
        inc2 = torch.cat(parts, dim=1)
        _record(kind + " cache", inc2, full2)
        torch.testing.assert_close(inc2, full2, **TOL)


@pytest.mark.parametrize("family,extra", [
    ("gpt2", {}),
    ("gpt2", {"tie_embeddings": False}),
    ("llama", {"n_kv_head": 2}),
    ("llama", {"n_kv_head": 2, "tie_embeddings": False, "attention_bias": True, "mlp_bias": True}),
    ("llama", {"n_kv_head": 1, "qkv_bias": True, "tie_embeddings": False}),
])
def test_save_loads_in_transformers(tmp_path, family, extra):
    from transformers import AutoModelForCausalLM

    cfg = DecoderConfig(family=family, vocab_size=VOCAB, d_model=64, n_layer=2, n_head=4, max_seq_len=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = DecoderLM(cfg).eval()
    _perturb(model)
    save_model(model, tmp_path / "m", generation_config={"max_new_tokens": 8})
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True,
                                                    attn_implementation="eager")
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert hf.config.model_type == ("gpt2" if family == "gpt2" else "qwen2" if extra.get("qkv_bias") else "llama")
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    else:
        assert hf.lm_head.weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 8 and gen["eos_token_id"] == 2
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.eval()(ids).logits
        out = model.logits(model(ids))
    _record(f"{family}{sorted(extra)} reverse", out, ref)
    torch.testing.assert_close(out, ref, **TOL)
    # And back into lmforge: same config, same weights.
    again, _ = load_model(tmp_path / "m")
    assert again.config.to_hf() == cfg.to_hf()
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_sharded_and_bin_checkpoints(tmp_path):
    from safetensors.torch import save_file

    hf = _hf_model("llama_gqa_tied")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(sd)
    (tmp_path / "sharded").mkdir()
    (tmp_path / "bin").mkdir()
    hf.config.to_json_file(tmp_path / "sharded" / "config.json")
    hf.config.to_json_file(tmp_path / "bin" / "config.json")
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / "sharded" / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(ids).logits
        for sub in ("sharded", "bin"):
            model, _ = load_model(tmp_path / sub)
            torch.testing.assert_close(model.logits(model(ids)), ref, **TOL)
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_model(tmp_path / "sharded")


def test_load_model_dtype_and_missing_weights(tmp_path):
    hf = _hf_model("gpt2")
    hf.save_pretrained(tmp_path / "m")
    model, _ = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.lm_head.weight is model.embed_tokens.weight
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    sd.pop("transformer.h.1.mlp.c_fc.weight")
    sd["transformer.h.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelError) as e:
        load_model(tmp_path / "m")
    msg = str(e.value)
    assert "transformer.h.1.mlp.c_fc.weight" in msg and "transformer.h.1.mlp.extra.weight" in msg
    assert "\n" not in msg


BASES = {
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                 bos_token_id=1, eos_token_id=1),
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64),
    "qwen2": dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "mistral": dict(model_type="mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    sliding_window=None),
}


@pytest.mark.parametrize("base,field,value", [
    ("llama", "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("llama", "rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}),
    ("llama", "pretraining_tp", 2),
    ("llama", "hidden_act", "gelu"),
    ("llama", "head_dim", 32),
    ("llama", "attn_logit_softcapping", 50.0),
    ("gpt2", "scale_attn_by_inverse_layer_idx", True),
    ("gpt2", "reorder_and_upcast_attn", True),
    ("gpt2", "activation_function", "relu"),
    ("gpt2", "add_cross_attention", True),
    ("gpt2", "scale_attn_weights", False),
    ("qwen2", "use_sliding_window", True),
    ("mistral", "sliding_window", 16),
    ("llama", "quantization_config", {"quant_method": "bitsandbytes"}),
])
def test_refused_fields(tmp_path, base, field, value):
    (tmp_path / "config.json").write_text(json.dumps({**BASES[base], field: value}))
    with pytest.raises(ModelError) as e:
        load_config(tmp_path)
    msg = str(e.value)
    assert f"field '{field}'" in msg and "not supported by lmforge" in msg and str(tmp_path) in msg
    assert "\n" not in msg


def test_supported_configs_and_defaults(tmp_path):
    for base, cfg in BASES.items():
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        c = load_config(tmp_path)
        assert c.family == ("gpt2" if base == "gpt2" else "llama") and c.qkv_bias == (base == "qwen2")
    # Legacy top-level rope_theta, harmless rope_scaling null, eos list.
    legacy = {**BASES["llama"], "rope_theta": 5e5, "rope_scaling": None, "eos_token_id": [2, 3]}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    c = load_config(tmp_path)
    assert c.rope_theta == 5e5 and c.eos_token_id == 2
    # A round trip through to_hf is the identity.
    for family in ("gpt2", "llama"):
        cfg = DecoderConfig(family=family, vocab_size=300, d_model=48, n_layer=3, n_head=6, dropout=0.1,
                            n_kv_head=None if family == "gpt2" else 2, tie_embeddings=family == "gpt2")
        assert DecoderConfig.from_hf(cfg.to_hf()).__dict__ == {**cfg.__dict__, "d_ff": cfg.ffn_dim,
                                                               **({"attention_bias": False, "mlp_bias": False}
                                                                  if family == "llama" else {})}


def test_unknown_model_type_and_not_a_model_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(ModelError, match="model_type 'bloom' is not supported.*gpt2, llama, qwen2, mistral"):
        load_model(tmp_path / "m")
    for p in (tmp_path / "empty", tmp_path / "nothing-here", tmp_path / "file.txt"):
        if p.name == "empty":
            p.mkdir()
        elif p.name == "file.txt":
            p.write_text("x")
        with pytest.raises(ModelError, match=r"is not a model directory: no config\.json.*pass a directory "
                                             r"written by lmforge or a Hugging Face checkpoint"):
            load_model(p)


def test_tokenizer_round_trip_and_vocab_check(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from lmforge.core.tokenizer import Tokenizer

    def word_level(n: int) -> Tokenizer:
        vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{f"w{i}": i + 4 for i in range(n - 4)}}
        hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        hf.pre_tokenizer = pre_tokenizers.Whitespace()
        return Tokenizer(hf)

    cfg = DecoderConfig(family="llama", vocab_size=VOCAB, d_model=32, n_layer=1, n_head=2, max_seq_len=32)
    model = DecoderLM(cfg)
    save_model(model, tmp_path / "m", tokenizer=word_level(200))
    loaded, tok = load_model(tmp_path / "m")
    assert tok is not None and tok.vocab_size == 200 and tok.encode("w5 w7") == [9, 11]
    with pytest.raises(ModelError, match="300 tokens.*256"):
        save_model(model, tmp_path / "m2", tokenizer=word_level(300))
    word_level(300).save(tmp_path / "m")
    with pytest.raises(ModelError, match=r"300 tokens but the model has only 256 embedding rows"):
        load_model(tmp_path / "m")


def test_module_name_map():
    from lmforge.models.hf import hf_module_name, hf_weight_is_transposed, lmforge_module_name

    g = DecoderConfig(family="gpt2", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2)
    ll = DecoderConfig(family="llama", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2)
    assert hf_module_name(g, "blocks.1.attn.c_attn") == "transformer.h.1.attn.c_attn"
    assert hf_weight_is_transposed(g, "blocks.1.attn.c_attn") and not hf_weight_is_transposed(ll, "blocks.1.attn.q_proj")
    assert hf_module_name(ll, "blocks.0.attn.q_proj.lora_A") == "model.layers.0.self_attn.q_proj.lora_A"
    assert lmforge_module_name(ll, "model.layers.1.mlp.down_proj") == "blocks.1.mlp.down_proj"
    with torch.device("meta"):
        for cfg in (g, ll):
            for name, _ in DecoderLM(cfg).named_modules():
                if name and name != "rotary":
                    assert lmforge_module_name(cfg, hf_module_name(cfg, name)) == name
