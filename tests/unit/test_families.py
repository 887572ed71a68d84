"""The family registry (lmforge.models.families): the built-in families' data, lookups and their errors, and a
family registered from tests/ only (tests/toy_family.py) that builds, saves, loads, generates, classifies and
takes a LoRA delta through the registry."""

import dataclasses

import pytest
import torch
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.delta import DeltaConfig, apply_delta, merge_delta
from lmforge.eval.generate import generate
from lmforge.eval.sampling import GenerationConfig
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.encoder import EncoderLM
from lmforge.models.encoder_config import EncoderConfig
from lmforge.models.families import families, family_for_hf_config, family_of, get_family, register_family
from lmforge.models.io import load_model, save_model
from lmforge.models.layers import GeluMLP
from lmforge.models.task import SequenceClassifier
from tests import toy_family

TINY = dict(vocab_size=64, d_model=32, n_layer=2, n_head=4, max_seq_len=32)


def test_builtin_families_in_order_with_their_model_types():
    assert [f.name for f in families()][:4] == ["gpt2", "llama", "bert", "t5"]
    for model_type, name in [("gpt2", "gpt2"), ("llama", "llama"), ("qwen2", "llama"), ("mistral", "llama"),
                             ("bert", "bert"), ("t5", "t5")]:
        assert family_for_hf_config({"model_type": model_type}).name == name
    assert {f.name: f.kind for f in families()[:4]} == {"gpt2": "decoder", "llama": "decoder", "bert": "encoder",
                                                      "t5": "encoder-decoder"}
    assert {f.name: f.pretrain_objective for f in families()[:4]} == {"gpt2": "causal_lm", "llama": "causal_lm",
                                                                    "bert": "mlm_nsp", "t5": "span"}
    assert get_family("llama").model_types["qwen2"] == "Qwen2"


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ModelError, match=r"^config.json of 'd': model_type 'bloom' is not supported by lmforge's "
                                         r"decoder models \(supported: gpt2, llama, qwen2, mistral"):
        family_for_hf_config({"model_type": "bloom"}, source="d")
    with pytest.raises(ConfigError, match=r"model family 'gtp2' is not one of gpt2, llama, bert, t5.*did you mean "
                                          r"'gpt2'"):
        get_family("gtp2")


def test_family_of_models_configs_and_classifiers():
    gpt2 = DecoderLM(DecoderConfig(**TINY))
    bert = EncoderLM(EncoderConfig(**TINY))
    assert family_of(gpt2) is get_family("gpt2") and family_of(gpt2.config) is get_family("gpt2")
    assert family_of(DecoderConfig(family="llama", **TINY)).name == "llama"
    assert family_of(SequenceClassifier(bert, ["a", "b"])) is get_family("bert")
    assert family_of(nn.Linear(2, 2)) is None and family_of("gpt2") is None


def test_finetune_plans_and_their_refusals():
    assert {f.name: dict(f.finetune) for f in families()[:4]} == {
        "gpt2": {"classification": "head", "text2text": "completion"},
        "llama": {"classification": "head", "text2text": "completion"},
        "bert": {"classification": "head", "token_classification": "token_head"},
        "t5": {"classification": "seq2seq", "text2text": "seq2seq"}}
    cases = [("bert", "text2text", "BERT has no decoder to generate text; use a gpt2/llama or t5 model, or a "
                                   "classification task"),
             ("gpt2", "token_classification", "token classification needs a bidirectional encoder (bert)"),
             ("t5", "token_classification", "token classification needs a bidirectional encoder (bert)"),
             ("llama", "regression", "")]
    for name, task_type, why in cases:
        with pytest.raises(ConfigError) as e:
            get_family(name).plan(task_type)
        assert str(e.value) == f"task type '{task_type}' is not available for model family '{name}': {why}"


def test_delta_defaults_are_peft_s():
    assert {f.name: f.lora_targets for f in families()[:4]} == {
        "gpt2": ("c_attn",), "llama": ("q_proj", "v_proj"), "bert": ("query", "value"), "t5": ("q", "v")}
    assert get_family("gpt2").fan_in_fan_out and not get_family("llama").fan_in_fan_out
    assert get_family("t5").adapter_sites == (["self_attn.o", "cross_attn.o"], ["ff.wo"])


def test_register_refuses_a_taken_name_or_model_type():
    gpt2 = get_family("gpt2")
    assert register_family(gpt2) is gpt2  # the same object again: nothing changes
    with pytest.raises(ValueError, match="already registered"):
        register_family(dataclasses.replace(gpt2))
    with pytest.raises(ValueError, match="model_type 'gpt2' of family 'gpt2b' already belongs to family 'gpt2'"):
        register_family(dataclasses.replace(gpt2, name="gpt2b"))
    assert "gpt2b" not in [f.name for f in families()]


# ---- a family from outside the package ------------------------------------------------------------------------

def _toy() -> toy_family.ToyLM:
    torch.manual_seed(0)
    return toy_family.ToyLM(toy_family.ToyConfig(**TINY, eos_token_id=1)).eval()


def test_toy_family_builds_saves_loads_and_generates(tmp_path):
    model = _toy()
    assert family_of(model) is toy_family.FAMILY and family_for_hf_config({"model_type": "toy"}) is toy_family.FAMILY
    assert all(isinstance(b.mlp, GeluMLP) for b in model.blocks)
    save_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert type(loaded) is toy_family.ToyLM and loaded.config.to_hf() == model.config.to_hf()
    ids = torch.tensor([[3, 5, 7, 9]])
    torch.testing.assert_close(loaded.logits(loaded(ids)), model.logits(model(ids)), rtol=0, atol=0)
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0)
    assert [r.tokens for r in generate(loaded, [[3, 5, 7], [4]], cfg)] == \
           [r.tokens for r in generate(model, [[3, 5, 7], [4]], cfg)]
    assert toy_family.FAMILY.hf_name("blocks.1.mlp.c_fc.lora_A") == "model.layers.1.mlp.c_fc.lora_A"


def test_toy_family_classifies_and_takes_lora(tmp_path):
    clf = SequenceClassifier(_toy(), ["neg", "pos"])
    clf.backbone.set_pad_token_id(2)
    save_model(clf, tmp_path / "clf")
    again, _ = load_model(tmp_path / "clf")
    ids, mask = torch.tensor([[3, 5, 7, 2], [4, 6, 2, 2]]), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert isinstance(again, SequenceClassifier) and again.family == "toy"
    torch.testing.assert_close(again(ids, mask), clf(ids, mask), rtol=0, atol=0)

    model = _toy().train()
    summary = apply_delta(model, DeltaConfig(method="lora", target_modules=list(toy_family.FAMILY.lora_targets)))
    assert len(summary.targets) == 2 * model.config.n_layer
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        h = model(torch.tensor([[3, 5, 7, 9]]))
        model.logits(h).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    merge_delta(model)
    model.eval()
    save_model(model, tmp_path / "lora")
    loaded, _ = load_model(tmp_path / "lora")
    ids = torch.tensor([[3, 5, 7, 9]])
    torch.testing.assert_close(loaded.logits(loaded(ids)), model.logits(model(ids)))
    assert not torch.allclose(loaded.logits(loaded(ids)), _toy().logits(_toy()(ids)))  # the delta is in it
