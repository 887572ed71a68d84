"""A toy language model, objective and batch source the Trainer and optimizer tests train in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.objectives.base import ObjectiveOutput
from lmforge.objectives.causal_lm import CausalLMObjective
from lmforge.train import Evaluation, RunSpec, Trainer, TrainerConfig

VOCAB = 24


class ToyLM(nn.Module):
    """Embedding -> (mix with previous token) -> MLP -> hidden; ``lm_head`` maps hidden to logits."""

    def __init__(self, vocab: int = VOCAB, d: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(dropout)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.checkpointing = False

    def set_activation_checkpointing(self, on: bool) -> None:
        self.checkpointing = on

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return self.norm(self.drop(torch.tanh(self.fc(torch.cat([h, prev], dim=-1)))))


class PlainCLM(CausalLMObjective):
    """The causal-LM objective with a plain (unchunked) cross-entropy, plus an accuracy metric."""

    def loss(self, model, batch):
        hidden = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        logits = model.lm_head(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")
        valid = labels != -100
        correct = ((logits.argmax(-1) == labels) & valid).sum()
        return ObjectiveOutput(loss_sum=loss_sum, count=valid.sum(), metrics={"accuracy": correct})


class ToySource:
    """Deterministic variable-length batches of a learnable pattern (next = prev + 1 mod V), right-padded."""

    def __init__(self, objective, seed: int = 0, max_len: int = 12, fixed: bool = False, fail_at: int | None = None):
        self.objective, self.seed, self.max_len, self.fixed, self.fail_at = objective, seed, max_len, fixed, fail_at
        self.pos = 0

    def next_batch(self, n: int):
        if self.fail_at is not None and self.pos + 1 == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        rng = np.random.default_rng([self.seed, self.pos])
        self.pos += 1
        lengths = np.full(n, self.max_len) if self.fixed else rng.integers(3, self.max_len + 1, size=n)
        seqs = [(rng.integers(1, VOCAB) + np.arange(length)) % VOCAB for length in lengths]
        return self.objective.collate(seqs)

    def state_dict(self):
        return {"pos": np.int64(self.pos), "lengths_seen": np.arange(3)}

    def load_state_dict(self, state):
        assert isinstance(state["lengths_seen"], np.ndarray)
        self.pos = int(state["pos"])


def seeded_model(dropout: float = 0.0, seed: int = 0) -> ToyLM:
    torch.manual_seed(seed)
    return ToyLM(dropout=dropout)


def make_cfg(**kw) -> TrainerConfig:
    base = dict(global_batch_size=8, micro_batch_size=4, lr=1e-2, warmup_steps=2, log_every=1, ckpt_every=0,
                device="cpu", tensorboard=False)
    base.update(kw)
    return TrainerConfig(**base)


def make_trainer(tmp: Path, name: str, model=None, cfg=None, max_steps=10, source=None, objective=None,
                 progress=False, evaluator=None):
    torch.manual_seed(0)
    model = model if model is not None else ToyLM()
    objective = objective or PlainCLM()
    source = source or ToySource(objective)
    return Trainer(model, objective, source, cfg or make_cfg(), RunSpec(tmp / name, max_steps, seed=1),
                   Evaluation(evaluator), progress=progress)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; backward replaces the incoming gradient with ``value`` everywhere (the loss stays finite,
    every gradient upstream of the poisoned tensor becomes non-finite)."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, ctx.value), None


def poison_gradient(module: nn.Module, when, value: float = float("inf")):
    """Make ``module``'s output gradient ``value`` (inf or nan) on forwards where ``when()`` is true: a non-finite
    gradient with a finite loss.  Returns the hook handle."""
    return module.register_forward_hook(lambda m, args, out: _PoisonGrad.apply(out, value) if when() else out)
