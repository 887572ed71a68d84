"""The registry of delta methods (lmforge.delta.registry): a method defined in this file alone -- a learned
per-channel scale on chosen Linear layers, (IA)³-like -- applies, trains, saves, loads, merges and switches off
like the built-in ones; and every built-in method that can be switched off gives back the base model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.delta import (DeltaConfig, DeltaMethod, apply_delta, delta_disabled, load_delta, lora_targets,
                           merge_delta, mergeable, method_names, register, save_delta)
from lmforge.delta.surgery import set_module
from lmforge.models.layers import Linear
from tests.unit.test_delta import IDS, model_of, run, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


class Scaled(nn.Module):
    """``base(x) * (1 + scale)``: the base Linear kept as a child, ``scale`` starts at zero."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.toy_scale = nn.Parameter(torch.zeros(base.out_features, device=base.weight.device))
        self.on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y * (1 + self.toy_scale) if self.on else y


def _scaled(model: nn.Module) -> dict[str, Scaled]:
    return {p: m for p, m in model.named_modules() if isinstance(m, Scaled)}


class ToyScale(DeltaMethod):
    name = "toyscale"
    counted_as = "scaled layers"

    def apply(self, model, cfg, tokenizer):
        paths = lora_targets(model, cfg)  # the Linear layers target_modules names (LoRA's defaults when unset)
        for path in paths:
            set_module(model, path, Scaled(model.get_submodule(path)))
        return paths

    def present(self, model):
        return bool(_scaled(model))

    def owns(self, name):
        return ".toy_scale" in name

    def mergeable(self, model):
        return True

    def merge(self, model):
        with torch.no_grad():
            for path, layer in _scaled(model).items():
                base, s = layer.base, 1 + layer.toy_scale
                base.weight.mul_(s[:, None])
                if base.bias is not None:
                    base.bias.mul_(s)
                set_module(model, path, base)

    def disable(self, model, cfg, off):
        for layer in _scaled(model).values():
            layer.on = not off


if "toyscale" not in method_names():  # a module imported twice must not register twice
    register(ToyScale())


def test_a_method_registered_from_a_test_file_applies_trains_saves_loads_and_merges(tmp_path):
    assert "toyscale" in method_names()
    with pytest.raises(ConfigError, match="valid: none, lora, .*, modules, toyscale"):
        DeltaConfig(method="toyscal").methods
    model = model_of("gpt2")
    with torch.no_grad():
        base = run(model, IDS)
    cfg = DeltaConfig(method="toyscale+bitfit")
    summary = apply_delta(model, cfg)
    assert summary.line().endswith(", 2 scaled layers") and summary.targets == []
    torch.testing.assert_close(run(model, IDS), base, rtol=0, atol=0)  # scale 0: the base model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trained if "toy_scale" in n} == {f"blocks.{i}.attn.c_attn.toy_scale" for i in range(2)}
    train_steps(model)
    assert model.blocks[0].attn.c_attn.toy_scale.abs().sum() > 0
    with torch.no_grad():
        want = run(model.eval(), IDS)
    save_delta(model, tmp_path / "d", cfg)
    assert (tmp_path / "d" / "delta.safetensors").is_file()  # no PEFT type: lmforge's format
    again = model_of("gpt2").eval()
    load_delta(again, tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(run(again, IDS), want, rtol=0, atol=0)
    with pytest.raises(ModelError, match="different base model"):
        load_delta(model_of("gpt2", seed=5), tmp_path / "d")
    with pytest.raises(ConfigError, match="already carries a delta"):
        apply_delta(again, DeltaConfig(method="lora"))
    assert mergeable(again)
    merge_delta(again)
    assert not _scaled(again) and type(again.blocks[0].attn.c_attn) is Linear
    with torch.no_grad():
        torch.testing.assert_close(run(again, IDS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, method", [("gpt2", "lora"), ("llama", "dora"), ("gpt2", "prompt"),
                                            ("t5", "prefix"), ("bert", "ladder"), ("t5", "adapter"),
                                            ("gpt2", "toyscale")])
def test_delta_disabled_gives_the_base_model_and_switches_back_on(family, method):
    model = model_of(family).eval()  # no task head: it trains with the delta, and stays on
    with torch.no_grad():
        base = run(model, IDS)
    cfg = DeltaConfig(method=method, num_virtual_tokens=3, ladder_reduction=4, adapter_type="pfeiffer")
    apply_delta(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        adapted = run(model, IDS)
        assert not torch.allclose(adapted, base, atol=1e-4)
        with delta_disabled(model, cfg) as same:
            assert same is model
            torch.testing.assert_close(run(model, IDS), base, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(run(model, IDS), adapted, rtol=0, atol=0)
