"""``delta_disabled`` for every delta method on every family where it applies (issue 24, item 1): the base
model's outputs inside, the delta model's after, dropout off inside, and no copy of any weight beyond the delta's
own size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.delta import DeltaConfig, apply_delta, delta_disabled, merge_delta
from tests.unit.test_delta import IDS, model_of, run

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["gpt2", "llama", "bert", "t5"]
ADDITIVE = ["lora", "dora", "pfeiffer", "prompt", "prefix", "ladder"]  # the base weights are never touched
IN_PLACE = ["bitfit", "houlsby", "modules", "lora+bitfit"]  # what trains is (partly) base weights
NOT_ON = {("ladder", "t5")}  # checked below: these combinations refuse at apply


def first_linear(model: nn.Module) -> str:
    """The first Linear layer inside the backbone's blocks (the module ``modules`` trains)."""
    return next(p for p, m in model.named_modules() if isinstance(m, nn.Linear) and ("blocks" in p or "layer" in p))


def config_for(method: str, model: nn.Module) -> DeltaConfig:
    kw = dict(num_virtual_tokens=3, ladder_reduction=4, bitfit_norms=True)
    if method in ("pfeiffer", "houlsby"):
        return DeltaConfig(method="adapter", adapter_type=method, **kw)
    if method == "modules":
        return DeltaConfig(method="modules", train_modules=[first_linear(model)], **kw)
    return DeltaConfig(method=method, **kw)


def storage(model: nn.Module) -> int:
    """Elements held by the model's parameters, buffers and kept base values, each storage counted once."""
    seen, total = set(), 0
    kept = [t for values in getattr(model, "_lmforge_base_values", {}).values() for t in values.values()]
    for t in [*model.parameters(), *model.buffers(), *kept]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes() // t.element_size()
    return total


@pytest.mark.parametrize("method, family", [(m, f) for m in ADDITIVE + IN_PLACE for f in FAMILIES
                                            if (m, f) not in NOT_ON])
def test_disabled_is_the_base_model_and_enabled_again_the_delta_model(method, family):
    model = model_of(family).eval()
    with torch.no_grad():
        base = run(model, IDS)
    before = storage(model)
    cfg = config_for(method, model)
    apply_delta(model, cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # a trained delta: every value it trains moved away from its start
                p.add_(torch.randn_like(p) * 0.1)
        adapted = run(model, IDS)
    assert not torch.allclose(adapted, base, atol=1e-4)
    # The delta's own size at most: its new parameters, or the kept base values of what it trains in place.
    assert storage(model) - before <= trained
    fresh = model_of(family).eval()  # the freshly built base, the same seed
    with torch.no_grad():
        want = run(fresh, IDS)
        with delta_disabled(model, cfg):
            got = run(model, IDS)
        again = run(model, IDS)
    tol = 0 if method in ADDITIVE else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(base, want, rtol=0, atol=0)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_dropout_is_off_inside_and_the_training_mode_restored(method):
    model = model_of("gpt2").train()
    cfg = config_for(method, model)
    apply_delta(model, cfg)
    with delta_disabled(model, cfg):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())


def test_a_merged_delta_cannot_be_switched_off():
    model = model_of("gpt2").eval()
    cfg = DeltaConfig(method="lora")
    apply_delta(model, cfg)
    merge_delta(model)
    with pytest.raises(ModelError, match="merged into its weights, so it cannot be switched off"):
        with delta_disabled(model, cfg):
            pass


def test_the_methods_not_applicable_refuse_at_apply():
    for method, family in sorted(NOT_ON):
        model = model_of(family)
        with pytest.raises(ConfigError):
            apply_delta(model, config_for(method, model))
