"""Task metrics: accuracy / macro-F1 for classification, SQuAD exact match / token F1 for short
answers, and entity-level F1 over BIO spans for tagging.

They follow the reference definitions (SQuAD v1.1's ``evaluate.py``, seqeval's default
conlleval-style chunking) so numbers are comparable with published ones.  All return a fraction in
[0, 1]; empty or misaligned inputs raise ValueError because a score of nothing is a caller bug.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence


def _check(preds: Sequence, golds: Sequence) -> None:
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} gold values")
    if not golds:
        raise ValueError("cannot score an empty set of examples")


def accuracy(preds: Sequence, golds: Sequence) -> float:
    _check(preds, golds)
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def macro_f1(preds: Sequence, golds: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean of per-label F1; a label absent from both preds and golds is skipped (it has no
    defined F1), while one that is predicted but never gold, or gold but never predicted, scores 0."""
    _check(preds, golds)
    labels = sorted(set(golds) | set(preds), key=str) if labels is None else list(labels)
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(preds, golds))
        n_pred, n_gold = sum(p == label for p in preds), sum(g == label for g in golds)
        if n_pred == 0 and n_gold == 0:
            continue
        scores.append(2 * tp / (n_pred + n_gold))
    if not scores:
        raise ValueError(f"none of the labels {labels!r} occurs in the predictions or gold values")
    return sum(scores) / len(scores)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(preds: Sequence[str], golds: Sequence[str]) -> float:
    _check(preds, golds)
    return sum(normalize_answer(p) == normalize_answer(g) for p, g in zip(preds, golds)) / len(golds)


def _token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:  # SQuAD: an empty answer matches only an empty answer
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def token_f1(preds: Sequence[str], golds: Sequence[str]) -> float:
    """Mean over examples of SQuAD's bag-of-normalised-tokens F1."""
    _check(preds, golds)
    return sum(_token_f1(p, g) for p, g in zip(preds, golds)) / len(golds)


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) chunks of one BIO sequence, end exclusive, chunked like seqeval's default:
    an I- tag after O or after another type starts a new chunk rather than being dropped."""
    spans: set[tuple[str, int, int]] = set()
    typ, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        continues = prefix == "I" and t == typ
        if typ is not None and not continues:
            spans.add((typ, start, i))
            typ = None
        if prefix in ("B", "I") and not continues:
            typ, start = t, i
    return spans


def seqeval_f1(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]) -> float:
    """Entity-level micro F1: a predicted chunk counts only if its type and both ends match a gold
    chunk.  Like seqeval, no chunk at all on either side scores 0."""
    _check(pred_tags, gold_tags)
    tp = n_pred = n_gold = 0
    for i, (p, g) in enumerate(zip(pred_tags, gold_tags)):
        if len(p) != len(g):
            raise ValueError(f"sequence {i}: {len(p)} predicted tags for {len(g)} gold tags")
        ps, gs = bio_spans(p), bio_spans(g)
        tp, n_pred, n_gold = tp + len(ps & gs), n_pred + len(ps), n_gold + len(gs)
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0
