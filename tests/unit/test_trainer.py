"""The Trainer: loss normalisation under accumulation, exact resume, NaN stop, logging, frozen modules."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError, RunError
from lmforge.objectives.causal_lm import CausalLMObjective
from lmforge.train import Evaluation, RunSpec, Trainer, TrainerConfig
from lmforge.train.checkpoint import list_checkpoints
from tests.unit.toy_training import (PlainCLM, ToyLM, ToySource, VOCAB, make_cfg, make_trainer, read_metrics,
                                      seeded_model)


# ---- loss normalisation -------------------------------------------------------------------------

def test_accumulation_does_not_change_the_gradient(tmp_path):
    objective = PlainCLM()
    batch = ToySource(objective, seed=3).next_batch(8)
    counts = (batch["labels"] != -100).sum(1)
    assert len(set(counts.tolist())) > 2  # rows really differ in length (padding matters)
    torch.manual_seed(0)
    base = ToyLM().double()
    grads = {}
    for micro in (8, 2, 1):
        model = copy.deepcopy(base)
        trainer = make_trainer(tmp_path, f"acc{micro}", model=model, objective=objective,
                               cfg=make_cfg(micro_batch_size=micro))
        stats = trainer.compute_gradients(batch)
        assert stats.count == int(counts.sum())
        grads[micro] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for micro in (2, 1):
        for n in grads[8]:
            torch.testing.assert_close(grads[micro][n], grads[8][n], rtol=1e-6, atol=1e-12)

    # ... and it is the gradient of the mean over every target token of the global batch
    model = copy.deepcopy(base)
    logits = model.lm_head(model(batch["input_ids"]))
    F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), ignore_index=-100).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[1][n], p.grad, rtol=1e-6, atol=1e-12)

    # the classic bug (mean per micro-batch, then averaged) gives a different gradient on this batch
    model = copy.deepcopy(base)
    for i in range(0, 8, 2):
        part = {k: v[i:i + 2] for k, v in batch.items()}
        lg = model.lm_head(model(part["input_ids"]))
        (F.cross_entropy(lg.reshape(-1, VOCAB), part["labels"].reshape(-1), ignore_index=-100) / 4).backward()
    assert not torch.allclose(model.fc.weight.grad, grads[8]["fc.weight"], rtol=1e-4)


def test_accumulation_must_divide_the_global_batch():
    with pytest.raises(ConfigError) as e:
        from_dict(TrainerConfig, {"global_batch_size": 10, "micro_batch_size": 4})
    msg = str(e.value)
    assert "10" in msg and "4" in msg and "micro_batch_size" in msg and "\n" not in msg
    assert from_dict(TrainerConfig, {"global_batch_size": 8, "micro_batch_size": 2}).accumulation_steps == 4
    assert from_dict(TrainerConfig, {"fused_adamw": True, "betas": [0.9, 0.99]}).fused_adamw == "true"


# ---- the loop -----------------------------------------------------------------------------------

def test_fit_learns_and_logs(tmp_path, capsys):
    calls = []

    def evaluator(model):
        assert not model.training and not torch.is_grad_enabled()
        calls.append(1)
        return {"val_loss": 1.0 / len(calls), "val_ppl": math.exp(1.0 / len(calls))}

    cfg = make_cfg(log_every=5, eval_every=10, ckpt_every=10, lr=3e-2, activation_checkpointing=True,
                   tensorboard=True)
    trainer = make_trainer(tmp_path, "fit", cfg=cfg, max_steps=30, evaluator=evaluator, progress=None)
    assert trainer.model.checkpointing  # activation checkpointing switched on through the model's hook
    final = trainer.fit().final
    lines = read_metrics(tmp_path / "fit")
    assert [r["step"] for r in lines] == [5, 10, 15, 20, 25, 30]
    for r in lines:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "elapsed_s", "accuracy"} <= set(r)
    assert [r["step"] for r in lines if "val_loss" in r] == [10, 20, 30] and "val_ppl" in lines[-1]
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]  # it learns the pattern
    assert lines[-1]["accuracy"] > 0.5
    assert final == lines[-1]
    # tokens = non-pad input tokens of every batch seen
    src = ToySource(PlainCLM())
    expected = sum(int(src.next_batch(8)["attention_mask"].sum()) for _ in range(30))
    assert lines[-1]["tokens"] == expected
    assert [s for s, _ in list_checkpoints(tmp_path / "fit")] == [10, 20, 30]
    assert (tmp_path / "fit" / "config.yaml").is_file()
    # not a terminal: one plain progress line per logged step on stderr
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(err) == 6 and err[0].startswith("step 5/30 | loss ") and "tok/s" in err[0] and "eta" in err[0]
    if importlib.util.find_spec("tensorboard") is not None:
        assert any((tmp_path / "fit" / "tb").iterdir())


def test_fit_returns_final_and_best_metrics_and_restores_the_best_on_request(tmp_path):
    from safetensors.torch import load_file

    def run(name, restore_best):
        scores = iter([0.2, 0.9, 0.4])  # the evaluations at steps 3, 6, 9: the best is step 6's

        def evaluator(model):
            return {"val_accuracy": next(scores)}

        evaluation = Evaluation(evaluator, select_metric="val_accuracy", select_mode="max", restore_best=restore_best)
        trainer = Trainer(seeded_model(), PlainCLM(), ToySource(PlainCLM()), make_cfg(eval_every=3, ckpt_every=3,
                                                                                      keep_last=1),
                          RunSpec(tmp_path / name, 9, seed=1), evaluation, progress=False)
        return trainer, trainer.fit()

    trainer, result = run("restored", restore_best=True)
    run_dir = tmp_path / "restored"
    lines = read_metrics(run_dir)
    assert result.final == lines[-1] and result.final["step"] == 9
    assert result.best_step == 6 and result.best == lines[[r["step"] for r in lines].index(6)]
    assert result.best["val_accuracy"] == 0.9
    ckpts = run_dir / "checkpoints"
    assert (result.run_dir, result.metrics_file) == (run_dir, run_dir / "metrics.jsonl")
    assert (result.last_checkpoint, result.best_checkpoint) == (ckpts / "step_0000009", ckpts / "step_0000006")
    assert result.restored_best
    best = load_file(ckpts / "step_0000006" / "model.safetensors")
    assert all(torch.equal(v, best[k]) for k, v in trainer.model.state_dict().items())

    trainer, result = run("final", restore_best=False)  # pretraining's way: the model keeps its final weights
    assert result.best_step == 6 and not result.restored_best
    final = load_file(tmp_path / "final" / "checkpoints" / "step_0000009" / "model.safetensors")
    assert all(torch.equal(v, final[k]) for k, v in trainer.model.state_dict().items())

    # a recipe's own last line (test scores) goes through the logger, after the Trainer's
    trainer.log_record({"step": 9, "test_accuracy": 1.0, "selected": "final"})
    assert read_metrics(tmp_path / "final")[-1] == {"step": 9, "test_accuracy": 1.0, "selected": "final"}

    plain = make_trainer(tmp_path, "plain", max_steps=3).fit()  # no evaluation, no checkpoints
    assert plain.best is None and plain.best_step is None and plain.last_checkpoint is None
    assert plain.best_checkpoint is None and not plain.restored_best


def test_activation_checkpointing_refused_for_models_without_it(tmp_path):
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        make_trainer(tmp_path, "noac", model=nn.Linear(4, 4), cfg=make_cfg(activation_checkpointing=True))


def _strip(lines):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in lines]


def test_resume_is_exact(tmp_path):
    """10 uninterrupted steps == a run killed after step 8 (checkpoint at 6) and resumed to 10."""

    def evaluator(model):  # consumes torch RNG: the Trainer must isolate it
        return {"val_loss": float(model.fc.weight.abs().mean() + 0 * torch.rand(()))}

    cfg = make_cfg(ckpt_every=3, eval_every=5, schedule="cosine")
    full = make_trainer(tmp_path, "full", model=seeded_model(0.2), cfg=cfg, evaluator=evaluator)
    full.fit()

    objective = PlainCLM()
    run = tmp_path / "killed"
    first = make_trainer(tmp_path, "killed", model=seeded_model(0.2), cfg=cfg, evaluator=evaluator,
                         objective=objective, source=ToySource(objective, fail_at=9))
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert [s for s, _ in list_checkpoints(run)] == [3, 5, 6]  # 5: the best by validation so far
    assert read_metrics(run)[-1]["step"] == 8  # lines 7 and 8 come after the checkpoint: resume cuts them

    torch.manual_seed(123)  # a different init and RNG: everything must come from the checkpoint
    second = Trainer(ToyLM(dropout=0.2), objective, ToySource(objective), cfg,
                     RunSpec(run, 10, seed=1, resume="true"), Evaluation(evaluator), progress=False)
    assert second.resuming
    second.fit()
    for (n, a), (_, b) in zip(full.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert _strip(read_metrics(run)) == _strip(read_metrics(tmp_path / "full"))
    for a, b in zip(full.optimizer.state_dict()["state"].values(), second.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_resume_with_more_steps_continues(tmp_path):
    cfg = make_cfg(ckpt_every=5, schedule="constant")
    full = make_trainer(tmp_path, "full", cfg=cfg, max_steps=10)
    full.fit()
    first = make_trainer(tmp_path, "ext", cfg=cfg, max_steps=5)
    first.fit()
    second = make_trainer(tmp_path, "ext", cfg=make_cfg(ckpt_every=5, schedule="constant", log_every=2),
                          max_steps=10)  # max_steps and log_every may change on resume
    assert second.resuming and second.fit().final["step"] == 10
    for a, b in zip(full.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    again = make_trainer(tmp_path, "ext", cfg=make_cfg(ckpt_every=5, schedule="constant", log_every=2),
                         max_steps=10)
    assert again.fit().final["step"] == 10  # already finished: nothing to do


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    class NanAt(PlainCLM):
        def __init__(self, bad_step):
            super().__init__()
            self.calls, self.bad_step = 0, bad_step

        def target_count(self, batch):
            self.calls += 1
            return super().target_count(batch)

        def loss(self, model, batch):
            out = super().loss(model, batch)
            if self.calls == self.bad_step:
                out.loss_sum = out.loss_sum * float("nan")
            return out

    objective = NanAt(5)
    trainer = make_trainer(tmp_path, "nan", objective=objective, cfg=make_cfg(ckpt_every=2, log_every=10),
                           source=ToySource(objective))
    with pytest.raises(RunError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "loss is nan at step 5" in msg and "step_0000004" in msg and "train.lr" in msg
    assert [s for s, _ in list_checkpoints(tmp_path / "nan")] == [2, 4]


def test_frozen_modules_are_placed_but_never_trained_or_saved(tmp_path):
    reference = nn.Linear(16, 16)
    before = copy.deepcopy(reference.state_dict())

    class WithReference(PlainCLM):
        def frozen_modules(self):
            return {"reference": reference}

        def loss(self, model, batch):
            out = super().loss(model, batch)
            hidden = model(batch["input_ids"])
            out.loss_sum = out.loss_sum + 1e-3 * reference(hidden).pow(2).sum()
            return out

    objective = WithReference()
    trainer = make_trainer(tmp_path, "frozen", objective=objective, source=ToySource(objective),
                           cfg=make_cfg(ckpt_every=5), max_steps=5)
    trainer.fit()
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    for k, v in reference.state_dict().items():
        assert torch.equal(v, before[k])
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in reference.parameters()}
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "frozen" / "checkpoints" / "step_0000005" / "model.safetensors")
    assert set(saved) == set(trainer.model.state_dict())


def test_causal_lm_objective_collate_and_counts():
    obj = CausalLMObjective(pad_id=0)
    packed = obj.collate(torch.arange(10).reshape(2, 5))
    assert packed["input_ids"].tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert packed["labels"].tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
    assert obj.target_count(packed) == 8 and obj.input_tokens(packed) == 8
    ragged = obj.collate([[5, 6, 7], [1, 2, 3, 4, 5]])
    assert ragged["input_ids"].tolist() == [[5, 6, 0, 0], [1, 2, 3, 4]]
    assert ragged["labels"].tolist() == [[6, 7, -100, -100], [2, 3, 4, 5]]
    assert obj.target_count(ragged) == 6 and obj.input_tokens(ragged) == 6


def test_causal_lm_objective_uses_chunked_cross_entropy():
    pytest.importorskip("lmforge.models.heads")
    obj = CausalLMObjective()
    torch.manual_seed(0)
    model = ToyLM()
    batch = obj.collate([[5, 6, 7], [1, 2, 3, 4, 5]])
    out = obj.loss(model, batch)
    ref = PlainCLM().loss(model, batch)
    assert int(out.count) == int(ref.count) == obj.target_count(batch)
    torch.testing.assert_close(out.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-5)
