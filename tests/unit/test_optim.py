"""The optimizer factory: decay groups, per-parameter rates, Adafactor, counted state, frozen parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError
from lmforge.train import RunSpec, Trainer, TrainerConfig, build_optimizer, param_groups
from tests.unit.toy_training import PlainCLM, ToyLM, ToySource, make_cfg, make_trainer, read_metrics, seeded_model


# ---- optimizer ----------------------------------------------------------------------------------

def test_weight_decay_groups_follow_parameter_rank():
    model = ToyLM()
    model.embed.weight.requires_grad_(False)
    groups = param_groups(model.named_parameters(), 0.1)
    decay = {n for n, _ in groups[0]["params"]}
    no_decay = {n for n, _ in groups[1]["params"]}
    assert decay == {"fc.weight", "lm_head.weight"} and groups[0]["weight_decay"] == 0.1
    assert no_decay == {"norm.weight", "norm.bias", "fc.bias"} and groups[1]["weight_decay"] == 0.0
    opt = build_optimizer(model, 1e-3, 0.1, fused="auto")
    assert sum(len(g["params"]) for g in opt.param_groups) == 5  # frozen embedding not optimised
    assert opt.param_groups[0]["fused"]  # fused AdamW exists for CPU in this PyTorch
    assert not build_optimizer(model, 1e-3, 0.1, fused="false").param_groups[0]["fused"]


def test_param_lr_gives_matching_parameters_their_own_scheduled_rate():
    from lmforge.train.schedule import LRScheduler

    model = ToyLM()
    groups = param_groups(model.named_parameters(), 0.1, {"lm_head": 1e-4, "*.bias": 5e-4})
    by_name = {n: g for g in groups for n, _ in g["params"]}
    assert "lr" not in by_name["fc.weight"] and "lr" not in by_name["norm.weight"]  # the base rate
    assert by_name["lm_head.weight"]["lr"] == 1e-4 and by_name["lm_head.weight"]["weight_decay"] == 0.1
    assert by_name["fc.bias"]["lr"] == 5e-4 and by_name["norm.bias"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = build_optimizer(model, 1e-3, 0.1, fused="false", param_lr={"lm_head": 1e-4})
    sched = LRScheduler(opt, lambda step: 0.5)  # the schedule scales every group's own rate
    assert sorted(g["lr"] for g in opt.param_groups) == [5e-5, 5e-4, 5e-4]
    with pytest.raises(ConfigError, match="pattern 'classifier' matches no trainable parameter; trainable ones "
                                          "include embed.weight"):
        param_groups(model.named_parameters(), 0.1, {"classifier": 1e-3})
    with pytest.raises(ConfigError, match="train.param_lr.head must be a learning rate > 0, got 0.0"):
        from_dict(TrainerConfig, {"param_lr": {"head": 0}})
    assert from_dict(TrainerConfig, {"param_lr": {"head": "1e-3"}}).param_lr == {"head": 1e-3}  # YAML's 1e-3 is a str


def test_adafactor_steps_relative_to_each_parameter_scale():
    """train.optimizer=adafactor: a parameter 100x larger moves 100x further for the same gradient (AdamW moves
    both by ~lr), which is what keeps T5's 0.01-scale query weights from being overwritten."""

    def one_step(kind: str, scale: float) -> float:
        torch.manual_seed(0)
        model = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            model.weight.mul_(scale)
        opt = build_optimizer(model, 1e-2, 0.0, fused="false", kind=kind)
        before = model.weight.detach().clone()
        model.weight.grad = torch.linspace(-1, 1, 64).reshape(8, 8)
        opt.step()
        return float((model.weight.detach() - before).norm())

    assert isinstance(build_optimizer(ToyLM(), 1e-2, 0.1, kind="adafactor"), torch.optim.Adafactor)
    assert one_step("adafactor", 100.0) == pytest.approx(100 * one_step("adafactor", 1.0), rel=1e-3)
    assert one_step("adamw", 100.0) == pytest.approx(one_step("adamw", 1.0), rel=1e-3)
    with pytest.raises(ConfigError, match="'sgd' is not one of 'adamw', 'adafactor'"):
        from_dict(TrainerConfig, {"optimizer": "sgd"})


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_counted_optimizer_state_matches_what_the_optimizer_allocates(kind):
    from lmforge.train.memory import optimizer_state_elements

    model = ToyLM()
    model.register_parameter("stack", nn.Parameter(torch.zeros(3, 4, 5)))  # a >2-D weight: factored per [4, 5]
    opt = build_optimizer(model, 1e-2, 0.1, fused="false", kind=kind)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    allocated = sum(t.numel() for state in opt.state.values() for k, t in state.items() if k != "step")
    assert allocated == sum(optimizer_state_elements(p, kind) for p in model.parameters())


def test_freeze_keeps_matching_parameters_as_loaded(tmp_path):
    model = seeded_model()
    before = model.embed.weight.detach().clone()
    trainer = make_trainer(tmp_path, "frozen", model=model, cfg=make_cfg(freeze=["embed"]), max_steps=5)
    trainer.fit()
    assert torch.equal(model.embed.weight, before) and not model.embed.weight.requires_grad
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(model.embed.weight) not in optimised and id(model.fc.weight) in optimised
    assert not torch.equal(model.fc.weight, seeded_model().fc.weight)  # the rest trains
    with pytest.raises(ConfigError, match="train.freeze: pattern 'shared' matches no parameter; parameters include "
                                          "embed.weight"):
        make_trainer(tmp_path, "nomatch", cfg=make_cfg(freeze=["shared"]))


def test_adafactor_trains_and_resumes_exactly(tmp_path):
    cfg = make_cfg(optimizer="adafactor", lr=3e-2, ckpt_every=4, schedule="constant")
    full = make_trainer(tmp_path, "full", cfg=cfg, max_steps=30)
    full.fit()
    lines = read_metrics(tmp_path / "full")
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
    objective = PlainCLM()
    first = make_trainer(tmp_path, "killed", cfg=cfg, max_steps=30, objective=objective,
                         source=ToySource(objective, fail_at=27))
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    torch.manual_seed(5)
    second = Trainer(ToyLM(), objective, ToySource(objective), cfg, RunSpec(tmp_path / "killed", 30, seed=1,
                                                                            resume="true"), progress=False)
    second.fit()
    for (n, a), (_, b) in zip(full.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), n
