"""The registry of pretraining objectives: the built-ins, their evaluators, and one registered from outside."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.data.loader import PackedWindows
from lmforge.eval.pretrain_eval import EVALUATORS, evaluate_causal_lm
from lmforge.objectives.causal_lm import CausalLMObjective
from lmforge.objectives.registry import PretrainingObjective, pretraining_objective, pretraining_objectives, register

SHARDS = SimpleNamespace(tokens=lambda split: (np.arange(400) % 13).astype(np.int64))


def test_builtins_and_their_evaluators():
    assert {"causal_lm", "mlm_nsp", "span"} <= set(pretraining_objectives())
    assert {n: pretraining_objective(n).settings_key for n in ("causal_lm", "mlm_nsp", "span")} == {
        "causal_lm": None, "mlm_nsp": "mlm", "span": "span"}
    assert {"causal_lm", "mlm_nsp", "span"} <= set(EVALUATORS)


def test_causal_lm_parts():
    spec = pretraining_objective("causal_lm")
    objective = spec.objective(SimpleNamespace(pad_id=None), None, 0)
    source = spec.source(SHARDS, "train", None, seq_len=16, settings=None, seed=3, shuffle=True)
    assert isinstance(objective, CausalLMObjective) and objective.pad_id == 0
    assert isinstance(source, PackedWindows) and source.next_batch(4)["input_ids"].shape == (4, 16)


def test_unknown_name_lists_the_registered():
    with pytest.raises(ConfigError, match="unknown pretraining objective 'nope'; registered: .*causal_lm"):
        pretraining_objective("nope")


class _ToyLM(torch.nn.Module):
    def __init__(self, vocab: int = 13, d: int = 8) -> None:
        super().__init__()
        self.embed, self.lm_head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None):
        return self.embed(input_ids)


def test_register_from_outside(monkeypatch):
    """An objective defined outside lmforge: registered, looked up by name, built and evaluated like a built-in."""

    class EveryOtherToken(CausalLMObjective):  # next-token loss on even positions only
        def collate(self, raw):
            batch = super().collate(raw)
            batch["labels"][:, 1::2] = self.ignore_index
            return batch

    def source(shards, split, tokenizer, *, seq_len, settings, seed, shuffle):
        windows = PackedWindows(shards.tokens(split), seq_len, seed=seed, shuffle=shuffle)

        def next_batch(n):  # the windows' shifted pairs back to raw windows, then this objective's collate
            b = windows.next_batch(n)
            return EveryOtherToken().collate(torch.cat([b["input_ids"], b["labels"][:, -1:]], 1))

        return SimpleNamespace(next_batch=next_batch)

    spec = register(PretrainingObjective("every_other_token_test", lambda tok, settings, seed: EveryOtherToken(),
                                         source))
    monkeypatch.setitem(EVALUATORS, spec.name, evaluate_causal_lm)
    assert pretraining_objective("every_other_token_test") is spec
    assert "every_other_token_test" in pretraining_objectives()
    with pytest.raises(ValueError, match="already registered"):
        register(spec)

    objective = spec.objective(None, None, 0)
    batch = spec.source(SHARDS, "train", None, seq_len=8, settings=None, seed=0, shuffle=False).next_batch(2)
    assert objective.target_count(batch) == 2 * 4
    out = objective.loss(_ToyLM(), batch)
    assert int(out.count) == 8 and out.loss_sum.requires_grad
    assert set(EVALUATORS[spec.name](_ToyLM(), [batch])) == {"val_loss", "val_ppl"}
