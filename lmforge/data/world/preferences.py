"""Preference pairs of the built-in world: for an instruction prompt, a better and a worse answer, tagged by how
they differ.

Every pair's chosen answer is correct and helpful, with a polite line or none; its rejected answer differs in one
way only, which is the pair's ``kind``:

* ``correctness`` -- the same wording and tone, one value wrong (another value of the same relation, a
  neighbouring list item, a number off by one or two, two list items swapped, the other label): only knowing or
  reading the answer tells the two apart;
* ``tone`` -- the same answer, then a rude line instead of a polite one or none;
* ``evasive`` -- an evasion instead of the answer.

Kinds come in equal shares, rotating per prompt.  Splits follow the instruction data's (:mod:`.instructions`):
``train`` and ``validation`` pairs are built on their prompts, the held-out ``test`` pairs on ``test_entities``
prompts (entities no train pair names).  Records use TRL's conversational preference format::

    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "Ashford\\nHappy to help!"}],
     "rejected": [{"role": "assistant", "content": "Kalgate\\nHappy to help!"}],
     "kind": "correctness", "type": "fact", "task_kind": "closed_book", "check": "text", "answer": "Ashford"}
"""

from __future__ import annotations

import random
from typing import Any

from lmforge.core.errors import ConfigError

from .instructions import build_instructions, respond

PAIR_KINDS = ("correctness", "tone", "evasive")
PREFERENCE_SPLITS = {"train": "train", "validation": "validation", "test": "test_entities"}


def _pair(record: dict[str, Any], kind: str, rng: random.Random) -> dict[str, Any]:
    good_tone = rng.choice(("plain", "polite"))
    state = rng.getstate()
    chosen = respond(record["answer"], good_tone, rng)
    if kind == "correctness":
        same = random.Random()
        same.setstate(state)  # the same draw: the same polite line
        rejected = respond(record["wrong"], good_tone, same)
    elif kind == "tone":
        rejected = respond(record["answer"], "rude", rng)
    else:
        rejected = respond(record["answer"], "evasive", rng)
    return {"prompt": record["messages"][:-1], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "kind": kind, "type": record["type"],
            "task_kind": record["kind"], "check": record["check"], "answer": record["answer"]}


def build_preferences(split: str, n_per_type: int, seed: int = 0, world_seed: int = 0,
                      types: list[str] | None = None) -> list[dict[str, Any]]:
    """``n_per_type`` pairs for each task type of the instruction split behind ``split``, kinds in equal shares."""
    if split not in PREFERENCE_SPLITS:
        raise ConfigError(f"unknown preference split {split!r}; use one of {', '.join(PREFERENCE_SPLITS)}")
    records = build_instructions(PREFERENCE_SPLITS[split], n_per_type, seed=seed, world_seed=world_seed, types=types)
    rng = random.Random(f"preferences:{seed}:{split}")
    return [_pair(r, PAIR_KINDS[i % len(PAIR_KINDS)], rng) for i, r in enumerate(records)]
