"""The weak-to-strong losses (lmforge/objectives/weak_to_strong.py) against a direct port of the paper's
``logconf_loss_fn`` (openai/weak-to-strong, weak_to_strong/loss.py) on identical inputs: the soft-label mixing, the
quantile threshold over the whole optimizer batch, the warm-up of α — as loss values, as gradients, and through the
Trainer's micro-batched accumulation (whose ``prepare_batch`` hook sees the whole optimizer batch)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.objectives.base import ObjectiveOutput
from lmforge.objectives.weak_to_strong import (SoftLabelObjective, confidence_alpha, confidence_target,
                                               soft_cross_entropy_sum)
from lmforge.train.run import RunSpec
from lmforge.train.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def paper_logconf(logits, labels, step_frac, aux_coef=0.5, warmup_frac=0.1):
    """The paper's auxiliary confidence loss, ported from its formula: binary soft labels ``labels [N, 2]``."""
    logits, labels = logits.float(), labels.float()
    coef = (1.0 if step_frac > warmup_frac else step_frac) * aux_coef
    preds = torch.softmax(logits, dim=-1)
    balance = labels.mean(dim=0)
    threshold = torch.quantile(preds[:, 0], balance[1])
    hard = torch.cat([(preds[:, 0] >= threshold)[:, None], (preds[:, 0] < threshold)[:, None]], dim=1)
    target = labels * (1 - coef) + hard.detach() * coef
    return F.cross_entropy(logits, target, reduction="none").mean()


def _inputs(n=24, seed=0, skew=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 2, generator=g) * 2
    p1 = torch.sigmoid(torch.randn(n, generator=g) * 2 + skew)  # an unbalanced weak labeller
    return logits, torch.stack([1 - p1, p1], dim=1)


@pytest.mark.parametrize("step_frac", [0.0, 0.03, 0.1, 0.1001, 0.5, 0.99])
@pytest.mark.parametrize("aux_coef, warmup_frac", [(0.5, 0.1), (0.75, 0.3)])
def test_confidence_loss_equals_the_paper_port(step_frac, aux_coef, warmup_frac):
    for seed in range(3):
        logits, weak = _inputs(seed=seed)
        a = logits.clone().requires_grad_(True)
        b = logits.clone().requires_grad_(True)
        ours = soft_cross_entropy_sum(a, confidence_target(a, weak, step_frac, aux_coef, warmup_frac)) / len(a)
        theirs = paper_logconf(b, weak, step_frac, aux_coef, warmup_frac)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_alpha_schedule_is_the_papers():
    # step_frac·aux_coef up to warmup_frac (inclusive), then aux_coef: a jump from 0.05 to 0.5 with the defaults
    assert confidence_alpha(0.0, 0.5, 0.1) == 0.0
    assert confidence_alpha(0.1, 0.5, 0.1) == pytest.approx(0.05)
    assert confidence_alpha(0.10001, 0.5, 0.1) == 0.5
    assert confidence_alpha(0.7, 0.5, 0.1) == 0.5


def test_threshold_matches_the_weak_class_balance():
    logits, weak = _inputs(n=40, seed=3, skew=1.0)
    target = confidence_target(logits, weak, 1.0, 1.0, 0.1)  # α = 1: the hardened predictions alone
    share = float(target[:, 1].mean())
    assert abs(share - float(weak[:, 1].mean())) <= 1.5 / 40  # the quantile's rounding: about one row


def test_multiclass_confidence_loss_is_refused_ce_is_not():
    with pytest.raises(ConfigError, match="binary"):
        SoftLabelObjective(SimpleNamespace(), 3, "logconf")
    SoftLabelObjective(SimpleNamespace(), 3, "ce")
    with pytest.raises(ConfigError, match="unknown"):
        SoftLabelObjective(SimpleNamespace(), 2, "hinge")


# ---- through the Trainer: micro-batches of 4, the quantile over the optimizer batch of 16 ----------------------
class _Base:
    """A classification objective over feature rows ``x``: the seam SoftLabelObjective wraps."""

    truncated = 0

    def collate(self, raw):
        return {"x": torch.stack([r["x"] for r in raw]), "labels": torch.tensor([r["label"] for r in raw]),
                "attention_mask": torch.ones(len(raw), 1, dtype=torch.long)}

    def target_count(self, batch):
        return int(batch["labels"].numel())

    def logits(self, model, batch):
        return model(batch["x"]).float()

    def loss(self, model, batch):
        return ObjectiveOutput(F.cross_entropy(self.logits(model, batch), batch["labels"], reduction="sum"),
                               int(batch["labels"].numel()))


class _Source:
    def __init__(self, rows):
        self.rows = rows

    def next_batch(self, n):
        raise AssertionError("not used")


@pytest.mark.parametrize("step", [0, 1, 5])
def test_trainer_accumulates_the_whole_batch_confidence_loss(tmp_path, step):
    torch.manual_seed(0)
    model = nn.Linear(6, 2)
    x = torch.randn(16, 6)
    _, weak = _inputs(n=16, seed=7)
    rows = [{"x": x[i], "label": int(weak[i].argmax()), "soft": weak[i].tolist()} for i in range(16)]
    objective = SoftLabelObjective(_Base(), 2, "logconf", aux_coef=0.5, warmup_frac=0.1)
    cfg = TrainerConfig(global_batch_size=16, micro_batch_size=4, lr=1e-3, warmup_steps=0, log_every=1,
                        eval_every=0, ckpt_every=0, device="cpu", tensorboard=False)
    trainer = Trainer(model, objective, _Source(rows), cfg, RunSpec(tmp_path / "run", max_steps=20), progress=False)
    trainer.step = step  # step_frac = 0, 0.05 (warm-up), 0.25 (after it)
    trainer.compute_gradients(objective.collate(rows))
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    paper_logconf(model(x), weak, step / 20).backward()
    theirs = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the control: thresholds taken per micro-batch of 4 give another gradient (the test can tell them apart)
    model.zero_grad(set_to_none=True)
    sum(paper_logconf(model(x[i:i + 4]), weak[i:i + 4], step / 20) * 4 for i in range(0, 16, 4)).div(16).backward()
    per_micro = [p.grad.clone() for p in model.parameters()]
    if step >= 1:  # at step 0 α = 0: no hardened term, every split agrees
        assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(ours, per_micro))


def test_ce_student_is_the_soft_cross_entropy_and_eval_batches_use_ground_truth():
    torch.manual_seed(1)
    model = nn.Linear(6, 2)
    x = torch.randn(8, 6)
    _, weak = _inputs(n=8, seed=2)
    obj = SoftLabelObjective(_Base(), 2, "ce")
    rows = [{"x": x[i], "label": 1, "soft": weak[i].tolist()} for i in range(8)]
    out = obj.loss(model, obj.collate(rows))
    torch.testing.assert_close(out.loss_sum / 8, F.cross_entropy(model(x), weak))  # the paper's xent_loss
    assert obj.prepare_batch(model, [obj.collate(rows)], 0.5) == {}
    gold = obj.loss(model, obj.collate([{k: v for k, v in r.items() if k != "soft"} for r in rows]))
    torch.testing.assert_close(gold.loss_sum, F.cross_entropy(model(x), torch.ones(8, dtype=torch.long),
                                                              reduction="sum"))
