"""Preference records: the formats users bring, read into pairs of conversations.

Every record becomes one or more :class:`PreferencePair` (``prompt``: the messages before the answers; ``chosen``
and ``rejected``: the answers' messages, usually one assistant message each; ``weight``; ``margin``; ``where``:
``file:line``).  Formats, by the keys a record holds:

=================================  ================================================================================
``prompt`` / ``chosen`` /          strings (a user turn and assistant turns) or message lists (TRL's
``rejected``                       conversational format); ``margin`` optional (a reward model's per-pair margin)
``chosen`` / ``rejected`` only     implicit prompt: two message lists sharing their first messages, which are the
                                   prompt (TRL's ``extract_prompt``)
``prompt`` / ``responses`` /       a K-way ranking, ``ranking`` listing response indices best first: all C(K, 2)
``ranking``                        pairs of the prompt, each weighted 1/C(K, 2) (InstructGPT)
=================================  ================================================================================

A record that is no preference -- a missing field, chosen identical to rejected, a ranking with ties or a missing
index -- is a one-line DataError naming its ``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, Iterator

from lmforge.core.errors import DataError
from lmforge.data.chat import ROLES
from lmforge.data.chat_data import iter_rows, message_list

_IDENTITY = {r: r for r in ROLES}


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    where: str
    weight: float = 1.0
    margin: float = 0.0
    kind: str | None = None  # the world's pair kind (correctness, tone, evasive), when known


def _messages(value: Any, role: str, where: str, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if value is None:
        raise DataError(f"{where}: no '{field}' field; a preference record has prompt/chosen/rejected, "
                        f"chosen/rejected message lists, or prompt/responses/ranking")
    return message_list(value, where, "role", "content", _IDENTITY, field)[0]


def _answer(value: Any, where: str, field: str) -> list[dict[str, str]]:
    messages = _messages(value, "assistant", where, field)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: '{field}' has no non-empty assistant message")
    return messages


def ranking_pairs(responses: list[Any], ranking: list[Any], where: str) -> list[tuple[Any, Any]]:
    """All (better, worse) pairs of a K-way ranking (``ranking`` lists the response indices best first)."""
    k = len(responses)
    if k < 2:
        raise DataError(f"{where}: a ranking needs at least 2 responses, got {k}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking) or sorted(ranking) != list(range(k)):
        missing = sorted(set(range(k)) - set(ranking))
        repeated = sorted({i for i in ranking if list(ranking).count(i) > 1})
        raise DataError(f"{where}: ranking {list(ranking)} must list each of the {k} response indices 0..{k - 1} "
                        f"exactly once (ties are not rankings)"
                        + (f"; missing {missing}" if missing else "") + (f"; repeated {repeated}" if repeated else ""))
    return list(combinations([responses[i] for i in ranking], 2))


def to_pairs(rec: Any, where: str) -> list[PreferencePair]:
    """One record -> its pairs (one, or C(K, 2) for a ranking)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a preference record must be a JSON object")
    margin = rec.get("margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise DataError(f"{where}: margin must be a number, not {margin!r}")
    if "responses" in rec or "ranking" in rec:
        prompt = _messages(rec.get("prompt"), "user", where, "prompt")
        responses = rec.get("responses")
        if not isinstance(responses, list):
            raise DataError(f"{where}: 'responses' must be a list of answers ranked by 'ranking'")
        ranking = rec.get("ranking")
        if not isinstance(ranking, list):
            raise DataError(f"{where}: 'ranking' must list the response indices best first")
        answers = [_answer(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
        pairs = ranking_pairs(answers, ranking, where)
        return [PreferencePair(prompt, c, r, where, 1.0 / len(pairs), float(margin)) for c, r in pairs]
    if "prompt" in rec:
        prompt = _messages(rec["prompt"], "user", where, "prompt")
        chosen, rejected = _answer(rec.get("chosen"), where, "chosen"), _answer(rec.get("rejected"), where, "rejected")
    else:  # implicit prompt: the shared first messages
        full_c, full_r = (_messages(rec.get(k), "assistant", where, k) for k in ("chosen", "rejected"))
        n = 0
        while n < min(len(full_c), len(full_r)) - 1 and full_c[n] == full_r[n]:
            n += 1
        if n == 0:
            raise DataError(f"{where}: no 'prompt' and chosen/rejected share no first message to take as the "
                            f"prompt; add a 'prompt' field")
        prompt, chosen, rejected = full_c[:n], full_c[n:], full_r[n:]
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical, so there is no preference; fix or drop it")
    return [PreferencePair(prompt, chosen, rejected, where, 1.0, float(margin), rec.get("kind"))]


def read_preferences(spec: str) -> Iterator[PreferencePair]:
    """Pairs of a file or a ``datasets`` folder, in order (a ranking's pairs together)."""
    for where, rec in iter_rows(spec, "preference data"):
        yield from to_pairs(rec, str(where))
