"""Delta methods that add inputs or a side network instead of changing weights: prompt tuning, prefix tuning and
ladder side tuning (lmforge.delta.prompt / prefix / ladder and lmforge.models.slots), without transformers/peft."""

from __future__ import annotations

import pytest
import torch

from lmforge.core.errors import ConfigError, ModelError
from lmforge.delta import DeltaConfig, apply_delta, load_delta, merge_delta, mergeable, save_delta
from lmforge.delta.ladder import LadderSide
from lmforge.models.task import SequenceClassifier
from tests.unit.test_delta import IDS, model_of, run, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(model, ids=IDS):
    out = run(model, ids)
    if isinstance(model, SequenceClassifier):
        return out.logsumexp(-1).mean()
    return model.logits(out).float().logsumexp(-1).mean()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_ladder_starts_at_the_base_and_trains_only_the_side(family):
    model = model_of(family)
    if family == "bert":
        model = SequenceClassifier(model, ["a", "b"])
    with torch.no_grad():
        base = run(model, IDS)
    s = apply_delta(model, DeltaConfig(method="ladder", ladder_reduction=4))
    side = getattr(model, "backbone", model).ladder
    assert isinstance(side, LadderSide) and side.config.d_model == 4 * (8 // 4)  # every head kept, each narrowed
    assert torch.equal(torch.sigmoid(side.gates / 0.1), torch.full((2,), 0.5))  # alpha = 0
    torch.testing.assert_close(run(model, IDS), base, rtol=0, atol=0)  # up = 0: exactly the base model
    direct = sum(p.numel() for p in side.parameters()) + (sum(p.numel() for p in model.classifier.parameters())
                                                          if family == "bert" else 0)
    assert s.trainable == direct and f"{direct:,}" in s.line()
    _loss(model).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".ladder." in f".{n}" or n.startswith("classifier") for n in grads)


def test_ladder_with_bert_pooler_trained_and_nothing_inside_the_frozen_pass():
    model = SequenceClassifier(model_of("bert"), ["a", "b"])
    s = apply_delta(model, DeltaConfig(method="ladder+modules", train_modules=["pooler"], ladder_reduction=4))
    pooler = sum(p.numel() for p in model.backbone.pooler.parameters())
    side = sum(p.numel() for p in model.backbone.ladder.parameters())
    assert s.trainable == side + pooler + sum(p.numel() for p in model.classifier.parameters())
    _loss(model).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.pooler.parameters())
    with pytest.raises(ConfigError, match="runs without gradients; with ladder only BERT's pooler"):
        apply_delta(SequenceClassifier(model_of("bert"), ["a", "b"]),
                    DeltaConfig(method="ladder+modules", train_modules=["attention"], ladder_reduction=4))
    with pytest.raises(ConfigError, match="stands alone"):
        DeltaConfig(method="ladder+lora").methods


def test_ladder_side_blocks_are_pruned_backbone_blocks():
    from lmforge.delta.ladder import hidden_dims

    model = model_of("gpt2")
    apply_delta(model, DeltaConfig(method="ladder", ladder_reduction=4))
    side = model.ladder
    hid = hidden_dims(model.embed_tokens.weight, side.config.d_model)
    assert torch.equal(side.blocks[1].attn_norm.weight, model.blocks[1].attn_norm.weight[hid])
    assert torch.equal(side.norm.weight, model.norm.weight[hid])
    # every side FFN input row is a backbone row restricted to the kept residual dims
    rows = model.blocks[0].mlp.c_fc.weight[:, hid]
    for r in side.blocks[0].mlp.c_fc.weight:
        assert (rows == r).all(-1).any()
    # a down-projection starts as the selection of those dims
    h = torch.randn(3, 32)
    torch.testing.assert_close(side.downs[0](h), h[:, hid])


def test_ladder_uses_the_least_training_memory():
    from lmforge.objectives.causal_lm import CausalLMObjective
    from lmforge.train.memory import measure_training_memory

    obj = CausalLMObjective(pad_id=0)
    rows = torch.randint(3, 64, (8, 24), generator=torch.Generator().manual_seed(2))  # activations dominate
    batch = obj.collate([r.tolist() for r in rows])
    mem = {}
    for method in ("none", "lora", "ladder", "prefix", "prompt"):
        model = model_of("gpt2")
        apply_delta(model, DeltaConfig(method=method, r=2, ladder_reduction=4, num_virtual_tokens=4))
        mem[method] = measure_training_memory(model, obj, batch)
    assert mem["ladder"]["activations"] < mem["lora"]["activations"]  # the ladders keep h_i for their weights
    assert mem["ladder"]["total"] < min(mem[m]["total"] for m in ("none", "lora", "prefix", "prompt"))
    assert mem["none"]["total"] == max(m["total"] for m in mem.values())


@pytest.mark.parametrize("method", ["ladder", "prefix", "prompt"])
def test_frozen_weights_byte_identical_and_round_trip(method, tmp_path):
    model = model_of("llama")
    cfg = DeltaConfig(method=method, ladder_reduction=4, num_virtual_tokens=3, prefix_projection=method == "prefix")
    apply_delta(model, cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not mergeable(model)
    with pytest.raises(ModelError, match="cannot be merged"):
        merge_delta(model)
    with torch.no_grad():
        want = run(model.eval(), IDS)
    save_delta(model, tmp_path / "d", cfg)
    again = model_of("llama")
    load_delta(again, tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(run(again.eval(), IDS), want, rtol=1e-6, atol=1e-6)
    other = model_of("llama", seed=5)  # another base: refused by fingerprint
    with pytest.raises(ModelError, match="different base model"):
        load_delta(other, tmp_path / "d")


def test_prompt_positions_and_masks():
    """A soft prompt takes positions 0..n-1: with a GPT-2 whose prompt equals the embeddings of tokens X, the
    outputs equal running X followed by the input."""
    model = model_of("gpt2")
    x = torch.tensor([5, 6, 7])
    with torch.no_grad():
        want = model(torch.cat([x.expand(2, -1), IDS], dim=1))[:, 3:]
    apply_delta(model, DeltaConfig(method="prompt", num_virtual_tokens=3, prompt_init="random"))
    with torch.no_grad():
        model.soft_prompt.weight.copy_(model.embed_tokens.weight[x])
        torch.testing.assert_close(model(IDS), want, rtol=1e-5, atol=1e-5)
        mask = torch.ones_like(IDS)
        torch.testing.assert_close(model(IDS, attention_mask=mask), want, rtol=1e-5, atol=1e-5)


def test_prompt_text_init_and_bad_settings():
    from lmforge.delta.prompt import add_soft_prompt

    class Tok:
        def encode(self, text):
            return [10, 11]

    model = model_of("bert")
    p = add_soft_prompt(model, 5, init="text", text="hi", tokenizer=Tok())
    torch.testing.assert_close(p.weight, model.embeddings.word_embeddings.weight[[10, 11, 10, 11, 10]])
    with pytest.raises(ConfigError, match="stands alone"):
        DeltaConfig(method="ladder+bitfit").methods
    with pytest.raises(ConfigError, match="one of 'prefix' and 'prompt'"):
        DeltaConfig(method="prefix+prompt").methods
    with pytest.raises(ConfigError, match="not 't5'"):
        apply_delta(model_of("t5"), DeltaConfig(method="ladder"))
    with pytest.raises(ConfigError, match="prompt_init_text"):
        apply_delta(model_of("gpt2"), DeltaConfig(method="prefix", prompt_init="text"))
    with pytest.raises(ConfigError, match="already carries"):
        apply_delta(model, DeltaConfig(method="prompt"))


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_prefix_trains_the_same_with_activation_checkpointing(family):
    grads = []
    for ckpt in (False, True):
        model = model_of(family).train()
        apply_delta(model, DeltaConfig(method="prefix", num_virtual_tokens=3))
        model.set_activation_checkpointing(ckpt)
        _loss(model).backward()
        grads.append(getattr(model, "prefix").table.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_text_init_delta_reloads_without_a_tokenizer_and_context_counts_the_prompt(tmp_path):
    from lmforge.eval.generate import GenerationConfig, generate, model_context_length

    class Tok:
        def encode(self, text):
            return [10, 11]

    model = model_of("gpt2")
    cfg = DeltaConfig(method="prompt+bitfit", num_virtual_tokens=4, prompt_init="text", prompt_init_text="hi")
    apply_delta(model, cfg, Tok())
    save_delta(model, tmp_path / "d", cfg)  # lmforge's format (a combination)
    again = model_of("gpt2")
    load_delta(again, tmp_path / "d")  # no tokenizer needed: the saved vectors replace the start
    torch.testing.assert_close(again.soft_prompt.weight, model.soft_prompt.weight)
    assert model_context_length(again) == 32 - 4
    with pytest.raises(ConfigError, match="exceeds the model's context of 28"):
        generate(again, [[5] * 20], GenerationConfig(max_new_tokens=10))
