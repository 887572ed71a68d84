"""Issue 28's memory claims, counted (lmforge.train.memory): DPO with LoRA and the adapter-disabled reference holds
one copy of the base — its training memory is within 10% of an SFT step's on the same sequences — while a frozen
copy as reference adds a second; precomputed reference log-probs mean no reference forward while training."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from lmforge.delta import DeltaConfig, apply_delta, delta_disabled
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.objectives.preference import (DisabledReference, FrozenReference, PrecomputedReference,
                                           PreferenceObjective)
from lmforge.objectives.sft import SFTObjective
from lmforge.train.memory import measure_training_memory

pytestmark = pytest.mark.usefixtures("one_thread")
V = 512


def pair_examples(n: int = 8, seed: int = 0) -> list[dict]:
    """Whole sequences with the answer's tokens marked, as the pair encoder writes them."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, V) for _ in range(rng.randint(20, 40))]
        ex = {}
        for side in ("chosen", "rejected"):
            answer = [rng.randrange(3, V) for _ in range(rng.randint(8, 24))]
            ex[f"{side}_ids"] = prompt + answer
            ex[f"{side}_mask"] = [0] * len(prompt) + [1] * len(answer)
        out.append(ex)
    return out


def lora_model(family: str) -> tuple[DecoderLM, DeltaConfig]:
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(family=family, vocab_size=V, d_model=128, n_layer=3, n_head=4, max_seq_len=128,
                                    dropout=0.0, pad_token_id=0))
    cfg = DeltaConfig(method="lora", r=8, alpha=16, dropout=0.0)
    apply_delta(model, cfg)
    return model, cfg


def resident(objective) -> int:
    """Bytes of the models the objective keeps beside the policy (a frozen reference copy)."""
    return sum(p.numel() * p.element_size() for m in objective.frozen_modules().values() for p in m.parameters())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_dpo_with_disabled_reference_costs_an_sft_step(family):
    model, cfg = lora_model(family)
    pairs = pair_examples()
    dpo = PreferenceObjective(["sigmoid"], reference=DisabledReference(lambda m: delta_disabled(m, cfg)), pad_id=0)
    sft = SFTObjective(chat_format=None, max_length=128, pad_id=0)
    sequences = [(e[f"{s}_ids"], e[f"{s}_mask"]) for e in pairs for s in ("chosen", "rejected")]
    dpo_mem = measure_training_memory(model, dpo, dpo.collate(pairs))
    sft_mem = measure_training_memory(model, sft, sft.collate(sequences))
    dpo_total = dpo_mem["total"] + resident(dpo)
    assert resident(dpo) == 0 and dpo_mem["parameters"] == sft_mem["parameters"]
    assert abs(dpo_total - sft_mem["total"]) <= 0.10 * sft_mem["total"], (dpo_mem, sft_mem)
    # the contrast: a frozen full copy as reference holds the base twice
    copy_ref = PreferenceObjective(["sigmoid"], reference=FrozenReference(copy.deepcopy(model).eval()), pad_id=0)
    copy_total = measure_training_memory(model, copy_ref, copy_ref.collate(pairs))["total"] + resident(copy_ref)
    assert copy_total - dpo_total >= 0.9 * dpo_mem["parameters"]


def test_precomputed_reference_runs_no_reference_forward():
    model, cfg = lora_model("gpt2")
    pairs = pair_examples(4)
    disabled = DisabledReference(lambda m: delta_disabled(m, cfg))
    live = PreferenceObjective(["sigmoid"], reference=disabled, pad_id=0)
    with torch.no_grad():
        (c, r), _, ref = live.pair_logps(model, live.collate(pairs))
    for e, rc, rr in zip(pairs, ref[0].tolist(), ref[1].tolist()):
        e["ref_chosen_logps"], e["ref_rejected_logps"] = rc, rr
    pre = PrecomputedReference()
    objective = PreferenceObjective(["sigmoid"], reference=pre, pad_id=0)
    forwards = []
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        out = objective.loss(model, objective.collate(pairs))
    finally:
        hook.remove()
    assert len(forwards) == 1 and pre.forwards == 0  # the policy's one concatenated forward, nothing else
    live_out = live.loss(model, live.collate(pairs))
    torch.testing.assert_close(out.loss_sum, live_out.loss_sum, rtol=1e-6, atol=1e-6)
