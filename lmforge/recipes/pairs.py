"""What `lmforge reward` and `lmforge dpo` share: preference data, its encoding in the model's chat format, and
the held-out measures.

Data: a preference file or datasets folder (:mod:`lmforge.data.preference_data`), or ``world-preferences``, the
built-in world's pairs (:mod:`lmforge.data.world.preferences`: train / validation on seen prompts, test on held-out
prompts and entities).  Each pair is rendered twice by the chat format (:class:`~lmforge.data.chat.ChatFormat`):
prompt + chosen and prompt + rejected; the answer's tokens (the end-of-turn token included) are the ones scored, the
prompt's earlier assistant turns are not.  A pair whose prompt alone fills ``max_length`` is dropped, one whose
answer runs past it is cut (both counted and said).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from lmforge.core.config import require
from lmforge.core.errors import ConfigError
from lmforge.data.chat import ChatFormat
from lmforge.data.preference_data import PreferencePair, read_preferences
from lmforge.data.world.preferences import build_preferences

WORLD_PAIRS = "world-preferences"


@dataclass
class PairDataConfig:
    train: str = WORLD_PAIRS
    """A .jsonl/.json/.csv/.parquet file or datasets folder of preference records, or ``world-preferences``."""
    validation: Optional[str] = None
    """The same kinds; None: the world's validation pairs, else none."""
    test: Optional[str] = None
    """Held-out pairs scored after training; None: the world's held-out pairs (prompts and entities never seen)."""
    max_length: Optional[int] = None
    """Tokens of prompt + answer (None: the model's max_seq_len)."""
    n_train: int = 60
    n_val: int = 10
    n_test: int = 20
    """World pairs per task type and split (14 types; kinds in equal shares)."""

    def __post_init__(self) -> None:
        require(self.max_length is None or self.max_length >= 2, "data.max_length", self.max_length, ">= 2")
        for key in ("n_train", "n_val", "n_test"):
            require(getattr(self, key) >= 0, f"data.{key}", getattr(self, key), ">= 0")


def _world_pairs(split: str, n: int) -> list[PreferencePair]:
    return [PreferencePair(p["prompt"], p["chosen"], p["rejected"], f"{WORLD_PAIRS}:{split}:{i}", kind=p["kind"])
            for i, p in enumerate(build_preferences(split, n))]


def load_pairs(cfg: PairDataConfig) -> dict[str, list[PreferencePair]]:
    world = cfg.train == WORLD_PAIRS
    out = {"train": _world_pairs("train", cfg.n_train) if world else list(read_preferences(cfg.train))}
    for split, spec, n in (("validation", cfg.validation, cfg.n_val), ("test", cfg.test, cfg.n_test)):
        if spec is not None:
            out[split] = list(read_preferences(spec))
        else:
            out[split] = _world_pairs(split, n) if world else []
    return out


class PairEncoder:
    """Renders pairs in a chat format and counts what ``max_length`` costs."""

    def __init__(self, fmt: ChatFormat, max_length: int) -> None:
        self.fmt, self.max_length = fmt, int(max_length)
        self.truncated = self.dropped = 0

    def side(self, pair: PreferencePair, answer: list[dict[str, str]]) -> tuple[list[int], list[int]] | None:
        messages = pair.prompt + answer
        weights = [0] * len(pair.prompt) + [1] * len(answer)
        enc = self.fmt.encode(messages, where=pair.where, weights=weights)
        ids, mask = list(enc.ids), list(enc.mask)
        first = next((i for i, m in enumerate(mask) if m), None)
        if first is None or first >= self.max_length:
            return None
        if len(ids) > self.max_length:
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            self.truncated += 1
        return ids, mask

    def encode(self, pair: PreferencePair) -> dict[str, Any] | None:
        chosen, rejected = self.side(pair, pair.chosen), self.side(pair, pair.rejected)
        if chosen is None or rejected is None:
            self.dropped += 1
            return None
        return {"chosen_ids": chosen[0], "chosen_mask": chosen[1], "rejected_ids": rejected[0],
                "rejected_mask": rejected[1], "weight": pair.weight, "margin": pair.margin, "kind": pair.kind,
                "where": pair.where}


def encode_pairs(encoder: PairEncoder, pairs: dict[str, list[PreferencePair]]) -> tuple[dict[str, list], dict]:
    examples, counts = {}, {}
    for split, items in pairs.items():
        t0, d0 = encoder.truncated, encoder.dropped
        examples[split] = [e for e in (encoder.encode(p) for p in items) if e is not None]
        counts[split] = {"pairs": len(items), "truncated": encoder.truncated - t0, "dropped": encoder.dropped - d0}
        c = counts[split]
        if c["truncated"] or c["dropped"]:
            print(f"note: {split}: {c['truncated']} answers cut at data.max_length={encoder.max_length}, "
                  f"{c['dropped']} of {c['pairs']} pairs dropped (the prompt alone fills it)", file=sys.stderr,
                  flush=True)
    if not examples["train"]:
        raise ConfigError(f"no training pair fits data.max_length={encoder.max_length}; raise data.max_length")
    return examples, counts


def by_prompt(examples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive pairs of one ranking (same ``where``) kept together: a batch never splits a prompt's pairs."""
    groups: list[list[dict[str, Any]]] = []
    for e in examples:
        if groups and groups[-1][0]["where"] == e["where"] and e["weight"] < 1.0:
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def pair_accuracy(scores: list[tuple[float, float]], examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of pairs whose chosen answer scores above the rejected one, ties counted as half; per kind too."""
    per: dict[str, list[float]] = defaultdict(list)
    for (c, r), e in zip(scores, examples):
        won = 1.0 if c > r else (0.5 if c == r else 0.0)
        per["all"].append(won)
        if e.get("kind"):
            per[e["kind"]].append(won)
    return {k: {"accuracy": sum(v) / len(v), "pairs": len(v)} for k, v in sorted(per.items())}


@torch.no_grad()
def score_pairs(score: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
                collate: Callable[[list], dict[str, torch.Tensor]], examples: list[dict[str, Any]],
                device: torch.device, batch_size: int = 32) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for k in range(0, len(examples), batch_size):
        batch = {n: v.to(device) for n, v in collate(examples[k:k + batch_size]).items() if torch.is_tensor(v)}
        c, r = score(batch)
        out += list(zip(c.tolist(), r.tolist()))
    return out
