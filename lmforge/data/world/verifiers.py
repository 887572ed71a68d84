"""Verifiers: score any answer to a world instruction, the same rule for exact match and for RL rewards.

An answer is judged on its **first line** only: the world's responses put the answer there and may add a second
line of tone (a polite or a rude remark, what the preference stages learn to tell apart), so correctness and tone
are scored separately.  The first line is normalised as SQuAD normalises answers (lower case, punctuation and the
articles a/an/the removed, runs of spaces collapsed), then compared by the record's ``check``:

* ``text`` -- the normalised strings are equal ("ashford." = "Ashford"; "Ashford, I think" is wrong);
* ``label`` -- the same, against one of the task's labels;
* ``number`` -- the line is one whole number in digits, optionally with thousands commas ("1,204" = 1204;
  "nineteen" and "19 coins" are wrong: the instruction asks for the number);
* ``list`` -- items separated by commas (and an optional "and" before the last), each normalised, equal in
  number and order to the answer's.

Extra words are wrong everywhere: a verifier that accepted any line containing the answer would reward a model
for listing every candidate.
"""

from __future__ import annotations

import re
import string
from typing import Any

from lmforge.core.errors import DataError

CHECKS = ("text", "label", "number", "list")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"[+-]?\d{1,3}(,\d{3})+|[+-]?\d+")


def first_line(response: str) -> str:
    for line in response.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def _items(line: str) -> list[str]:
    parts = [p for p in re.split(r",|\band\b", line) if p.strip()]
    return [normalise(p) for p in parts]


def _number(line: str) -> int | None:
    text = line.strip().rstrip(".!").strip()
    if not _NUMBER.fullmatch(text):
        return None
    return int(text.replace(",", ""))


def verify(record: dict[str, Any], response: str) -> bool:
    """Is ``response`` a right answer to the instruction ``record`` (its ``answer`` and ``check``)?"""
    check, answer = record.get("check"), record.get("answer")
    if check not in CHECKS or answer is None:
        raise DataError(f"instruction record of type {record.get('type')!r} has check={check!r} and answer="
                        f"{answer!r}; a verifier needs an answer and one of {', '.join(CHECKS)}")
    line = first_line(response)
    if check == "number":
        got = _number(line)
        return got is not None and got == int(answer)
    if check == "list":
        expected = answer if isinstance(answer, list) else _items(str(answer))
        return _items(line) == [normalise(str(x)) for x in expected]
    return normalise(line) == normalise(str(answer)) and normalise(line) != ""


def reward(record: dict[str, Any], response: str) -> float:
    """1.0 for a right answer, 0.0 otherwise: the verifier as an RL reward."""
    return float(verify(record, response))
