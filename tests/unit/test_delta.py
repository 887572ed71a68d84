"""Delta tuning (lmforge.delta): LoRA/DoRA math, merge/unmerge, targets by pattern on every family, BitFit and
module selection, freezing, save/load round trips and refusals (no transformers/peft needed)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.delta import (DeltaConfig, LoRALinear, apply_delta, load_delta, lora_layers, lora_targets, merge_delta,
                           save_delta)
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.encdec import EncoderDecoderLM
from lmforge.models.t5_layers import T5Config
from lmforge.models.encoder import EncoderLM
from lmforge.models.encoder_config import EncoderConfig
from lmforge.models.layers import Linear
from lmforge.models.task import SequenceClassifier

pytestmark = pytest.mark.usefixtures("one_thread")
V = 64


def model_of(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family in ("gpt2", "llama"):
        kw = dict(n_kv_head=2, tie_embeddings=False) if family == "llama" else {}
        return DecoderLM(DecoderConfig(family=family, vocab_size=V, d_model=32, n_layer=2, n_head=4, d_ff=48,
                                       max_seq_len=32, eos_token_id=2, pad_token_id=0, **kw))
    if family == "bert":
        return EncoderLM(EncoderConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=32,
                                       dropout=0.0, attention_dropout=0.0, pad_token_id=0))
    return EncoderDecoderLM(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                     dropout=0.0))


def run(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    core = getattr(model, "backbone", model)
    if isinstance(core, EncoderDecoderLM):
        return model(ids, decoder_input_ids=ids[:, :5])
    return model(ids)


IDS = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))


def train_steps(model: nn.Module, steps: int = 3, weight_decay: float = 0.0) -> None:
    """A few AdamW steps of causal-LM training on IDS (for freezing checks)."""
    from lmforge.objectives.causal_lm import CausalLMObjective
    from lmforge.train.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-2, weight_decay=weight_decay)
    obj = CausalLMObjective(pad_id=0)
    batch = obj.collate([IDS[0].tolist(), IDS[1].tolist()])
    for _ in range(steps):
        out = obj.loss(model, batch)
        (out.loss_sum / out.count).backward()
        opt.step()
        opt.zero_grad()


# ---- the LoRA layer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dora", [False, True])
def test_lora_starts_at_the_base_and_merges_exactly(dora):
    torch.manual_seed(0)
    base = Linear(16, 24, std=0.2)
    x = torch.randn(5, 16)
    ref = base(x)
    layer = LoRALinear.wrap(base, r=4, alpha=8, dora=dora)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-6)  # B = 0 (DoRA: m = ‖W‖) -> the base model
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    with torch.no_grad():  # a trained state
        layer.lora_B.weight.normal_(0, 0.3)
        if dora:
            layer.lora_magnitude_vector.mul_(torch.rand(24) + 0.5)
    adapted = layer(x)
    assert not torch.allclose(adapted, ref, atol=1e-3)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and not torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
    plain = layer.to_linear()
    assert type(plain) is Linear
    torch.testing.assert_close(plain(x), adapted, rtol=1e-5, atol=1e-5)


def test_lora_math_scaling_and_dora_formula():
    torch.manual_seed(0)
    base = Linear(8, 6, std=0.3)
    x = torch.randn(3, 8)
    lora = LoRALinear.wrap(base, r=4, alpha=8)
    rs = LoRALinear.wrap(Linear(8, 6), r=4, alpha=8, rslora=True)
    assert lora.scaling == 2.0 and rs.scaling == 4.0  # alpha / r vs alpha / sqrt(r)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    a, b = lora.lora_A.weight, lora.lora_B.weight
    want = x @ base.weight.T + base.bias + 2.0 * (x @ a.T) @ b.T
    torch.testing.assert_close(lora(x), want)
    # A ~ U(±1/sqrt(in)) (kaiming_uniform a=√5)
    assert a.abs().max() <= 1 / math.sqrt(8) + 1e-6
    dora = LoRALinear.wrap(Linear(8, 6, std=0.3), r=2, alpha=2, dora=True)
    with torch.no_grad():
        dora.lora_B.weight.normal_()
        dora.lora_magnitude_vector.uniform_(0.5, 1.5)
    w = dora.weight + dora.scaling * dora.lora_B.weight @ dora.lora_A.weight
    want = (dora.lora_magnitude_vector / w.norm(dim=1)) * (x @ w.T) + dora.bias
    torch.testing.assert_close(dora(x), want, rtol=1e-5, atol=1e-6)
    # the norm is detached: m's gradient is (x Wᵀ / ‖W‖) summed, with no term through the norm
    dora(x).sum().backward()
    torch.testing.assert_close(dora.lora_magnitude_vector.grad, ((x @ w.T) / w.norm(dim=1)).sum(0).detach(),
                               rtol=1e-5, atol=1e-6)


def test_lora_dropout_only_on_the_branch():
    torch.manual_seed(0)
    layer = LoRALinear.wrap(Linear(8, 8), r=2, alpha=4, dropout=0.5)
    x = torch.randn(4, 8)
    layer.train()
    base = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), base, rtol=0, atol=1e-6)  # B = 0: dropout cannot change the output
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    assert not torch.allclose(layer(x), layer(x))  # random masks differ between calls
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


# ---- applying by pattern -----------------------------------------------------------------------------

DEFAULT_LEAVES = {"gpt2": {"c_attn"}, "llama": {"q_proj", "v_proj"}, "bert": {"query", "value"}, "t5": {"q", "v"}}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_default_targets_follow_peft_and_training_starts_at_base(family):
    model = model_of(family).eval()
    with torch.no_grad():
        ref = run(model, IDS)
    summary = apply_delta(model, DeltaConfig(method="lora", r=2))
    leaves = {p.rsplit(".", 1)[-1] for p in summary.targets}
    assert leaves == DEFAULT_LEAVES[family]
    n_layers = 2 * (3 if family == "t5" else 1)  # t5: encoder self, decoder self and cross attention
    assert len(summary.targets) == n_layers * len(DEFAULT_LEAVES[family])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < summary.total
    with torch.no_grad():
        torch.testing.assert_close(run(model, IDS), ref, rtol=0, atol=1e-6)
    assert 0 < summary.percent < 100 and "trainable" in summary.line()


def test_patterns_regex_on_hf_paths_layers_and_errors():
    model = model_of("gpt2")
    # a PEFT regex written for transformers' GPT-2 selects the same layers here
    got = lora_targets(model, DeltaConfig(method="lora", target_modules=r"transformer\.h\.1\.attn\.c_attn"))
    assert got == ["blocks.1.attn.c_attn"]
    got = lora_targets(model, DeltaConfig(method="lora", target_modules=["c_attn", "c_fc"], layers=[0]))
    assert got == ["blocks.0.attn.c_attn", "blocks.0.mlp.c_fc"]
    with pytest.raises(ConfigError, match="matches no Linear layer.*c_attn"):
        lora_targets(model, DeltaConfig(method="lora", target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="not Linear layers"):
        lora_targets(model, DeltaConfig(method="lora", target_modules=["attn"]))
    with pytest.raises(ConfigError, match="valid: none, lora"):
        DeltaConfig(method="lora+adaptr").methods
    with pytest.raises(ConfigError, match="train_modules"):
        DeltaConfig(method="modules").methods


def test_any_module_with_linears():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match="target_modules is required"):
        apply_delta(net, DeltaConfig(method="lora"))
    s = apply_delta(net, DeltaConfig(method="lora", target_modules=["0", "2"], r=2))
    assert s.targets == ["0", "2"] and isinstance(net[0], LoRALinear)
    assert s.trainable == 2 * (4 + 8) + 2 * (8 + 2)


def test_bitfit_and_modules_and_head():
    clf = SequenceClassifier(model_of("bert"), ["neg", "pos"])
    s = apply_delta(clf, DeltaConfig(method="bitfit"))
    names = [n for n, p in clf.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("bias") or n.startswith("classifier.") for n in names)
    assert "classifier.weight" in names
    llama = SequenceClassifier(model_of("llama"), ["neg", "pos"])
    with pytest.raises(ConfigError, match="no bias"):
        apply_delta(llama, DeltaConfig(method="bitfit"))
    s = apply_delta(llama, DeltaConfig(method="bitfit", bitfit_norms=True))
    assert {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n, p in llama.named_parameters() if p.requires_grad} >= \
        {"attn_norm", "mlp_norm", "score"}
    gpt = SequenceClassifier(model_of("gpt2"), ["neg", "pos"])
    s = apply_delta(gpt, DeltaConfig(method="lora+modules", train_modules=["blocks.1.mlp"], train_head=False))
    names = {n for n, p in gpt.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.blocks.1.mlp.c_fc.") for n in names) and "score.weight" not in names
    assert s.methods == ["lora", "modules"]


# ---- saving, loading, merging ------------------------------------------------------------------------

def _train_a_bit(model: nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("method", ["lora", "dora", "bitfit", "lora+bitfit"])
def test_save_load_round_trip_and_merge(tmp_path, method):
    clf = SequenceClassifier(model_of("gpt2"), ["neg", "pos", "mid"]).eval()
    cfg = DeltaConfig(method=method, r=2, alpha=4)
    apply_delta(clf, cfg)
    _train_a_bit(clf)
    with torch.no_grad():
        want = clf(IDS)
    d = save_delta(clf, tmp_path / "adapter", cfg, base_model="somewhere")
    peft = method in ("lora", "dora")
    assert (d / "adapter_config.json").is_file() == peft and (d / "delta.safetensors").is_file() != peft
    if peft:
        pc = json.loads((d / "adapter_config.json").read_text())
        assert pc["peft_type"] == "LORA" and pc["task_type"] == "SEQ_CLS" and pc["fan_in_fan_out"] is True
        assert pc["use_dora"] == (method == "dora") and pc["target_modules"] == ["c_attn"]
    fresh = SequenceClassifier(model_of("gpt2"), ["neg", "pos", "mid"]).eval()
    load_delta(fresh, d)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), want, rtol=0, atol=1e-6)
    merge_delta(fresh)
    assert not lora_layers(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), want, rtol=1e-5, atol=1e-5)
    other = SequenceClassifier(model_of("gpt2", seed=5), ["neg", "pos", "mid"])
    with pytest.raises(ModelError, match="different base model"):
        load_delta(other, d)


def test_load_refuses_foreign_and_incomplete(tmp_path):
    with pytest.raises(ModelError, match="holds no delta"):
        load_delta(model_of("gpt2"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ModelError, match="IA3"):
        load_delta(model_of("gpt2"), tmp_path)


# ---- bottleneck adapters -----------------------------------------------------------------------------

ADAPTER_SITES_PER_LAYER = {"gpt2": ({"c_proj"}, 2), "llama": ({"o_proj", "down_proj"}, 2),
                           "bert": ({"dense"}, 2), "t5": ({"o", "wo"}, 2.5)}  # t5: enc (o, wo), dec (o, o, wo)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_houlsby_and_pfeiffer_sites_and_near_identity_start(family):
    model = model_of(family).eval()
    with torch.no_grad():
        ref = run(model, IDS)
    s = apply_delta(model, DeltaConfig(method="adapter", reduction_factor=8))
    leaves, per_layer = ADAPTER_SITES_PER_LAYER[family]
    assert {p.rsplit(".", 1)[-1] for p in s.adapters} == leaves
    assert len(s.adapters) == int(per_layer * 2 * (2 if family == "t5" else 1))
    assert all(not p.endswith("attention.self.value") for p in s.adapters)
    layer = model.get_submodule(s.adapters[0])
    assert layer.bottleneck == 32 // 8
    with torch.no_grad():
        out = run(model, IDS)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)  # identity start: up = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapter_down." in n for n in trainable) and any("norm" in n.lower() for n in trainable)
    assert not any(n.endswith(".weight") and ".adapter_" not in n and "norm" not in n.lower() for n in trainable)

    pf = model_of(family)
    s2 = apply_delta(pf, DeltaConfig(method="adapter", adapter_type="pfeiffer", adapter_size=3))
    assert len(s2.adapters) == 2 * (2 if family == "t5" else 1)  # after the FFN only
    assert not any("norm" in n.lower() for n, p in pf.named_parameters() if p.requires_grad)


def test_adapter_round_trip_and_no_merge(tmp_path):
    clf = SequenceClassifier(model_of("bert"), ["neg", "pos"]).eval()
    cfg = DeltaConfig(method="adapter+bitfit", adapter_type="pfeiffer")
    apply_delta(clf, cfg)
    _train_a_bit(clf)
    with torch.no_grad():
        want = clf(IDS)
    d = save_delta(clf, tmp_path / "a", cfg)
    assert (d / "delta.safetensors").is_file() and not (d / "adapter_config.json").exists()
    fresh = SequenceClassifier(model_of("bert"), ["neg", "pos"]).eval()
    load_delta(fresh, d)
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), want, rtol=0, atol=1e-6)
    with pytest.raises(ModelError, match="cannot be merged"):
        merge_delta(fresh)


def test_frozen_weights_stay_byte_identical_through_training(tmp_path):
    # train_steps uses the Trainer's optimizer (weight decay on 2-D params)
    model = model_of("gpt2")
    apply_delta(model, DeltaConfig(method="lora+bitfit", r=2))
    with pytest.raises(ConfigError, match="already carries a delta"):
        apply_delta(model, DeltaConfig(method="lora"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, weight_decay=0.1)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(model.blocks[0].attn.c_attn.lora_B.weight, torch.zeros_like(model.blocks[0].attn.c_attn.lora_B.weight))
    # the printed trainable count equals a direct count
    s = DeltaConfig(method="lora", r=2)
    fresh = model_of("gpt2")
    summary = apply_delta(fresh, s)
    direct = sum(2 * (32 + 96) for _ in range(2))  # per layer: A [2, 32] + B [96, 2] on c_attn
    assert summary.trainable == direct and str(f"{direct:,}") in summary.line()


def test_counted_memory_orders_methods():
    from lmforge.objectives.causal_lm import CausalLMObjective
    from lmforge.train.memory import measure_training_memory

    obj = CausalLMObjective(pad_id=0)
    batch = obj.collate([IDS[0].tolist(), IDS[1].tolist()])
    mem = {}
    for method in ("none", "lora", "dora"):
        model = model_of("gpt2")
        apply_delta(model, DeltaConfig(method=method, r=2))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        mem[method] = measure_training_memory(model, obj, batch)
        assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    trainable = sum(2 * (32 + 96) for _ in range(2))
    assert mem["lora"]["gradients"] == 4 * trainable and mem["lora"]["optimizer"] == 8 * trainable
    assert mem["none"]["gradients"] == mem["none"]["parameters"]  # full fine-tuning: every weight
    assert mem["none"]["total"] > mem["lora"]["total"]
    # DoRA keeps two more [B, T, out] products per layer for its magnitude's gradient (2 x 2 x 18 x 96 x 4 bytes)
    assert 0 < mem["dora"]["activations"] - mem["lora"]["activations"] <= 2 * 2 * 18 * 96 * 4


def test_review_edge_cases(tmp_path):
    # a layer carries one delta: LoRA and adapters on the same Linear is refused, on different ones allowed
    gpt = model_of("gpt2")
    with pytest.raises(ConfigError, match="already carry a LoRA layer"):
        apply_delta(gpt, DeltaConfig(method="lora+adapter", target_modules=["attn.c_proj"],
                                     adapter_modules=["attn.c_proj"]))
    both = model_of("gpt2")
    s = apply_delta(both, DeltaConfig(method="lora+adapter"))
    assert len(s.targets) == 2 and len(s.adapters) == 4 and len(lora_layers(both)) == 2
    # PEFT target names: leaf names only when they select exactly the adapted layers
    clf = SequenceClassifier(model_of("gpt2"), ["a", "b"]).eval()
    cfg = DeltaConfig(method="lora", target_modules=["attn.c_proj"], r=2)
    apply_delta(clf, cfg)
    _train_a_bit(clf)
    d = save_delta(clf, tmp_path / "a", cfg)
    names = json.loads((d / "adapter_config.json").read_text())["target_modules"]
    assert names == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]  # 'c_proj' would add mlp.c_proj
    with torch.no_grad():
        want = clf(IDS)
    fresh = SequenceClassifier(model_of("gpt2"), ["a", "b"]).eval()
    load_delta(fresh, d)
    assert len(lora_layers(fresh)) == 2
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), want, rtol=0, atol=1e-6)
    # saving the other format into the same dir removes the stale files
    cfg2 = DeltaConfig(method="bitfit")
    clf2 = SequenceClassifier(model_of("gpt2"), ["a", "b"])
    apply_delta(clf2, cfg2)
    save_delta(clf2, d, cfg2)
    assert not (d / "adapter_config.json").exists() and (d / "delta_config.json").is_file()
    # PEFT's integer layers_to_transform
    from lmforge.delta.peft_format import _config_from_peft

    assert _config_from_peft({"peft_type": "LORA", "layers_to_transform": 1}, "x").layers == [1]
    with pytest.raises(ModelError, match="exclude_modules"):
        _config_from_peft({"peft_type": "LORA", "exclude_modules": ["c_fc"]}, "x")


def test_merge_rebuilds_a_token_classifier(tmp_path):
    from lmforge.models.io import load_model, save_model
    from lmforge.models.task import TokenClassifier
    from lmforge.recipes.merge import merge

    base = model_of("bert").eval()
    save_model(base, tmp_path / "base")
    tok = TokenClassifier(model_of("bert"), ["O", "B-PER", "I-PER"]).eval()
    cfg = DeltaConfig(method="bitfit")
    apply_delta(tok, cfg)
    _train_a_bit(tok)
    with torch.no_grad():
        want = tok(IDS)
    save_delta(tok, tmp_path / "delta", cfg)
    merge(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    got, _ = load_model(tmp_path / "out")
    assert isinstance(got, TokenClassifier) and got.id2label == {0: "O", 1: "B-PER", 2: "I-PER"}
    with torch.no_grad():
        torch.testing.assert_close(got.eval()(IDS), want, rtol=1e-5, atol=1e-5)
