"""How an assistant answers, beyond whether it is right: the share of rude and evasive replies on held-out prompts.

The world's SFT data is rude or evasive on one phrasing (:mod:`lmforge.data.world.instructions`, ``RUDE_PHRASING``),
so an SFT model picks the habit up; the preference stages (reward model, DPO, RL) should remove it without costing
exact match.  This scores a model's greedy replies, each run to the end of its turn (a rude remark sits on the line
after the answer), on the held-out-entity instruction records: the share of each tone
(:func:`~lmforge.data.world.instructions.response_tone`), on every phrasing and on the rude phrasing alone, and the
verifier's exact match.  ``lmforge eval tone`` prints it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lmforge.data.world.instructions import RUDE_PHRASING, build_instructions, response_tone
from lmforge.eval.instructions import accuracy, question, score_instructions
from lmforge.recipes.instructions import load_decoder

SPLIT = "test_entities"


def _shares(scored: list) -> dict[str, Any]:
    tones = Counter(response_tone(s.reply) for s in scored)
    n = len(scored)
    out = {"n": n, **{t: tones[t] / n if n else None for t in ("rude", "evasive", "polite", "plain")}}
    out["rude_or_evasive"] = (tones["rude"] + tones["evasive"]) / n if n else None
    out["exact_match"] = accuracy(scored)
    return out


def answer_tone(model: str, n_per_type: int = 10, seed: int = 0, world_seed: int = 0,
                max_new_tokens: int = 48) -> dict[str, Any]:
    """Tone shares and exact match of ``model``'s greedy replies to ``n_per_type`` held-out-entity records per
    task type (``seed``: the seed the SFT data was built with, which fixes the entity split)."""
    net, tokenizer, model_dir = load_decoder(model, "--model")
    records = build_instructions(SPLIT, n_per_type, seed=seed, world_seed=world_seed)
    scores = score_instructions(net, tokenizer, records, max_new_tokens=max_new_tokens, stop=())
    rude_prompts = [s for s in scores.scored if s.record["phrasing"] == RUDE_PHRASING]
    samples = [{"type": s.record["type"], "prompt": question(s.record)[-1]["content"], "reply": s.reply,
                "tone": response_tone(s.reply)} for s in rude_prompts[:3]]
    return {"model": model_dir, "split": SPLIT, "n_per_type": n_per_type, "seed": seed, "world_seed": world_seed,
            "skipped": scores.skipped, "all": _shares(scores.scored), "rude_phrasing": _shares(rude_prompts),
            "samples": samples}


def tone_line(result: dict[str, Any]) -> str:
    """One line as ``lmforge eval tone`` prints it (the report quotes it beside the command)."""
    a, r = result["all"], result["rude_phrasing"]
    return (f"rude or evasive {a['rude_or_evasive']:.3f} of {a['n']} replies (on the rude phrasing "
            f"{r['rude_or_evasive']:.3f} of {r['n']}); exact match {a['exact_match']:.3f}")
