"""DPO under the Trainer: micro-batching never changes the loss or the updates (every pair counted over the global
batch: the objective returns a sum and the pair count; the Trainer divides by the global count, as it does across
ranks — tests/unit/test_distributed.py checks that division under 2-rank gloo for any objective)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmforge.data.examples import ExampleSource
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.objectives.preference import FrozenReference, PreferenceObjective
from lmforge.train import RunSpec, Trainer, TrainerConfig
from tests.unit.test_preference_memory import V, pair_examples

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo"], ["sigmoid", "sft"]])
def test_dpo_steps_equal_with_and_without_micro_batches(tmp_path, loss_type):
    examples = pair_examples(6, seed=1)  # the same six pairs every step (shuffled): the loss must fall
    runs = {}
    for micro in (None, 2, 3):
        torch.manual_seed(0)
        model = DecoderLM(DecoderConfig(family="gpt2", vocab_size=V, d_model=64, n_layer=2, n_head=4, max_seq_len=128,
                                        dropout=0.0)).train()
        objective = PreferenceObjective(loss_type, beta=0.5,
                                        reference=FrozenReference(copy.deepcopy(model).eval().requires_grad_(False)))
        cfg = TrainerConfig(global_batch_size=6, micro_batch_size=micro, lr=1e-3, warmup_steps=0, schedule="constant",
                            weight_decay=0.0, eval_every=0, ckpt_every=100, log_every=1, device="cpu")
        name = f"micro{micro}"
        Trainer(model, objective, ExampleSource(list(examples), objective.collate, seed=0), cfg,
                RunSpec(tmp_path / name, 4, seed=0, resume="false"), progress=False).fit()
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [(r["loss"], r["rewards/margins"]) for r in rows if "loss" in r]
    base = runs["microNone"]
    assert len(base) == 4 and base[3][0] < base[0][0]  # it learns
    for name in ("micro2", "micro3"):
        for (loss, margin), (ref_loss, ref_margin) in zip(runs[name], base):
            assert loss == pytest.approx(ref_loss, rel=1e-5) and margin == pytest.approx(ref_margin, rel=1e-4, abs=1e-6)
