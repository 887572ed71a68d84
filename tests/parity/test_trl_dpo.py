"""The DPO family against TRL on identical token batches (issue 28): DPOTrainer's own loss and metrics for sigmoid,
ipo, hinge, robust and the RPO sft term; SimPO against TRL's CPO trainer (``loss_type="simpo"``); cdpo against
Mitchell's formula (TRL's sigmoid no longer applies label smoothing)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.core.tokenizer import Tokenizer
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.io import save_model
from lmforge.objectives.preference import (METRICS, DisabledReference, FrozenReference, PreferenceObjective,
                                           PrecomputedReference, collate_pairs)
from lmforge.objectives.logprobs import sequence_logprobs

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "the sun is warm today"] * 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An lmforge GPT-2 (dropout 0) and its reference (a perturbed copy, so ratios are not all zero), saved and
    loaded back as transformers' GPT2LMHeadModel."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("trl-dpo")
    tok = Tokenizer.train(TEXTS, vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"])
    torch.manual_seed(0)
    cfg = DecoderConfig(family="gpt2", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, max_seq_len=64,
                        dropout=0.0, eos_token_id=tok.token_to_id("<|endoftext|>"),
                        pad_token_id=tok.token_to_id("<|pad|>"))
    policy = DecoderLM(cfg).eval()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(policy, d / "policy", tokenizer=tok)
    save_model(reference, d / "reference", tokenizer=tok)
    hf_tok = AutoTokenizer.from_pretrained(d / "policy")
    hf_tok.pad_token = "<|pad|>"
    return (policy, reference, GPT2LMHeadModel.from_pretrained(d / "policy").eval(),
            GPT2LMHeadModel.from_pretrained(d / "reference").eval(), hf_tok, d)


def pairs(vocab: int, n: int = 6, equal_chosen: bool = False, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = 5 if equal_chosen else rng.randint(2, 9)
        out.append({"prompt_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(2, 7))],
                    "chosen_ids": [rng.randrange(3, vocab) for _ in range(k)],
                    "rejected_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(2, 9))]})
    return out


def trl_dpo(models, examples, tmp_path, **kwargs) -> tuple[float, dict[str, float]]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    _, _, hf, hf_ref, hf_tok, _ = models
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, **kwargs)
    ds = Dataset.from_dict({"prompt": ["the cat"], "chosen": [" sat"], "rejected": [" ran"]})
    trainer = DPOTrainer(model=copy.deepcopy(hf), ref_model=copy.deepcopy(hf_ref), args=args, train_dataset=ds,
                         processing_class=hf_tok)
    inputs = DataCollatorForPreference(pad_token_id=hf_tok.pad_token_id)(examples)
    trainer.model.eval()  # the metrics land under "eval"; dropout is 0 either way
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs, False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def ours(models, examples, **kwargs) -> tuple[float, dict[str, float]]:
    policy, reference = models[0], models[1]
    objective = PreferenceObjective(reference=FrozenReference(reference), **kwargs)
    with torch.no_grad():
        out = objective.loss(policy, collate_pairs(examples, pad_id=0))
    n = out.count
    return float(out.loss_sum) / n, {k: float(v) / n for k, v in out.metrics.items()}


@pytest.mark.parametrize("loss_type,extra", [
    ("sigmoid", {}), ("ipo", {}), ("hinge", {}), ("robust", {"label_smoothing": 0.2}),
])
def test_dpo_loss_and_metrics_equal_trl(models, tmp_path, loss_type, extra):
    examples = pairs(models[0].config.vocab_size)
    ref_loss, ref_metrics = trl_dpo(models, examples, tmp_path, beta=0.3, loss_type=[loss_type], **extra)
    loss, metrics = ours(models, examples, loss_types=[loss_type], beta=0.3, **extra)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    for name in METRICS:
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-5, abs=1e-6), name


def test_rpo_sft_term_equals_trl_when_chosen_lengths_agree(models, tmp_path):
    """TRL averages the sft term over the batch's chosen tokens, lmforge per pair (RPO): equal lengths, equal loss."""
    examples = pairs(models[0].config.vocab_size, equal_chosen=True)
    ref_loss, _ = trl_dpo(models, examples, tmp_path, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    loss, _ = ours(models, examples, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1)
    assert loss == pytest.approx(ref_loss, rel=1e-5)


def test_simpo_equals_trl_cpo_loss(models):
    """TRL's CPO trainer computes SimPO from length-averaged log-probs (``cpo_loss``); the same logps in, the same
    loss and rewards out (``cpo_alpha = 0``: pure SimPO, no NLL term)."""
    from trl.experimental.cpo import CPOTrainer

    policy = models[0]
    examples = pairs(policy.config.vocab_size, seed=3)
    objective = PreferenceObjective(loss_types=["simpo"], beta=2.0, simpo_gamma=0.8, label_smoothing=0.1)
    batch = collate_pairs(examples, pad_id=0)
    with torch.no_grad():
        out = objective.loss(policy, batch)
        (c, r), (nc, nr), _ = objective.pair_logps(policy, batch)

    class Args:  # the attributes cpo_loss reads
        alpha, loss_type, simpo_gamma, beta, label_smoothing = 0.0, "simpo", 0.8, 2.0, 0.1
        accelerator = type("A", (), {"device": torch.device("cpu")})()

    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(Args(), c / nc, r / nr)
    assert float(out.loss_sum) / out.count == pytest.approx(float(losses.mean()), rel=1e-6)
    assert float(out.metrics["rewards/chosen"]) / out.count == pytest.approx(float(chosen_rewards.mean()), rel=1e-6)
    assert float(out.metrics["rewards/rejected"]) / out.count == pytest.approx(float(rejected_rewards.mean()), rel=1e-6)


def test_cdpo_is_mitchells_formula(models):
    policy, reference = models[0], models[1]
    examples = pairs(policy.config.vocab_size, seed=5)
    eps, beta = 0.15, 0.4
    objective = PreferenceObjective(loss_types=["cdpo"], beta=beta, label_smoothing=eps,
                                    reference=FrozenReference(reference))
    batch = collate_pairs(examples, pad_id=0)
    with torch.no_grad():
        out = objective.loss(policy, batch)
        logits = []
        for e in examples:
            ratio = 0.0
            for side, sign in (("chosen", 1), ("rejected", -1)):
                ids = torch.tensor([e["prompt_ids"] + e[f"{side}_ids"]])
                score = torch.tensor([[0] * len(e["prompt_ids"]) + [1] * len(e[f"{side}_ids"])])
                ratio += sign * float(sequence_logprobs(policy, ids, None, score)[0] -
                                      sequence_logprobs(reference, ids, None, score)[0])
            logits.append(beta * ratio)
    z = torch.tensor(logits, dtype=torch.float64)
    expected = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    assert float(out.loss_sum) / out.count == pytest.approx(float(expected), rel=1e-5)


def test_references_agree_and_precomputed_runs_no_reference_forward(models):
    """A frozen copy of the base, the policy with its delta off, and precomputed log-probs give one loss; only the
    first two run a reference forward."""
    policy = models[0]
    examples = pairs(policy.config.vocab_size, seed=7)
    batch = collate_pairs(examples, pad_id=0)
    frozen = FrozenReference(copy.deepcopy(policy))
    disabled = DisabledReference(lambda m: torch.no_grad())  # a policy with no delta: its base is itself
    with torch.no_grad():
        a = PreferenceObjective(reference=frozen).loss(policy, batch)
        b = PreferenceObjective(reference=disabled).loss(policy, batch)
        (c, r), _, _ = PreferenceObjective(reference=frozen).pair_logps(policy, batch)
    pre = PrecomputedReference()
    batch_pre = collate_pairs([{**e, "ref_chosen_logps": float(x), "ref_rejected_logps": float(y)}
                               for e, x, y in zip(examples, c, r)], pad_id=0)
    with torch.no_grad():
        p = PreferenceObjective(reference=pre).loss(policy, batch_pre)
    assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-6) == pytest.approx(float(p.loss_sum))
    assert float(a.loss_sum) / a.count == pytest.approx(math.log(2), rel=1e-6)  # policy = reference: DPO at ln 2
    assert frozen.forwards == 2 and disabled.forwards == 1 and pre.forwards == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_types=["dpo"]), "not one of"),
    (dict(loss_types=["sigmoid"]), "compares with a reference"),
    (dict(loss_types=["sigmoid", "sft"], loss_weights=[1.0]), "one weight per type"),
    (dict(loss_types=["simpo", "sigmoid"], reference=PrecomputedReference()), "reference-free"),
    (dict(loss_types=["simpo"], beta=0.0), "beta"),
    (dict(loss_types=["simpo"], label_smoothing=0.5), "label_smoothing"),
])
def test_bad_settings_are_one_line(kwargs, match):
    from lmforge.core.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        PreferenceObjective(**kwargs)
