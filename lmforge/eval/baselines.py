"""Model-free baselines that put a fine-tuned score in context.

A task number means little without the floor it must beat: the majority class (or answer, or tag)
says what guessing the prior gives, and a bag-of-words logistic regression says what keyword
spotting gives.  A task meant to need understanding (e.g. negation in world-sentiment) should keep
the bag-of-words score well below perfect.  Everything runs on CPU in seconds and is deterministic.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import torch

from lmforge.core.errors import ConfigError, DataError

from .task_metrics import accuracy, exact_match, macro_f1, seqeval_f1, token_f1

_WORD = re.compile(r"\w+|[^\w\s]")
_L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4)
_DEFAULT_L2 = 1e-3


def _majority(values: Sequence) -> object:
    """Most frequent value; ties go to the smallest by ``str`` so the result never depends on order."""
    if not values:
        raise DataError("a majority baseline needs at least one training example")
    counts = Counter(values)
    top = max(counts.values())
    return min((v for v, c in counts.items() if c == top), key=str)


def majority_baseline(train_labels: Sequence, test_labels: Sequence) -> dict:
    label = _majority(train_labels)
    preds = [label] * len(test_labels)
    return {"accuracy": accuracy(preds, test_labels), "macro_f1": macro_f1(preds, test_labels), "prediction": label}


def _tokens(text: str) -> list[str]:
    """Lower-cased words with punctuation split off ("bad." -> "bad", ".")."""
    return _WORD.findall(text.lower())


def _counts(texts: Sequence[str], vocab: dict[str, int]) -> torch.Tensor:
    x = torch.zeros(len(texts), len(vocab))
    for i, text in enumerate(texts):
        for word, c in Counter(_tokens(text)).items():
            j = vocab.get(word)
            if j is not None:
                x[i, j] = c
    return x


def _fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, mean cross-entropy + l2 * |W|^2 / 2, by full-batch LBFGS from
    zeros: the objective is convex, so the fit is deterministic and independent of any seed."""
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def bow_logreg_baseline(train_texts: Sequence[str], train_labels: Sequence, test_texts: Sequence[str],
                        test_labels: Sequence, val_texts: Sequence[str] | None = None,
                        val_labels: Sequence | None = None, seed: int = 0) -> dict:
    """Unigram counts (train vocabulary) + L2 logistic regression; the L2 strength is picked on the
    validation set from a small grid when one is given (else 1e-3).  ``seed`` is accepted for a uniform
    baseline signature; the fit starts from zeros and needs no randomness."""
    if len(train_texts) != len(train_labels) or not train_texts:
        raise DataError(f"bag-of-words baseline: {len(train_texts)} train texts for {len(train_labels)} labels; "
                        "pass one label per text and at least one example")
    classes = sorted(set(train_labels), key=str)
    index = {c: i for i, c in enumerate(classes)}
    vocab: dict[str, int] = {}
    for text in train_texts:
        for word in _tokens(text):
            vocab.setdefault(word, len(vocab))
    x, y = _counts(train_texts, vocab), torch.tensor([index[label] for label in train_labels])

    def predict(params: tuple[torch.Tensor, torch.Tensor], texts: Sequence[str]) -> list:
        logits = _counts(texts, vocab) @ params[0] + params[1]
        return [classes[i] for i in logits.argmax(1).tolist()]

    if val_texts and val_labels:
        best = None
        for l2 in _L2_GRID:  # strongest penalty first, so a tie keeps the simpler model
            params = _fit(x, y, len(classes), l2)
            acc = accuracy(predict(params, val_texts), val_labels)
            if best is None or acc > best[0]:
                best = (acc, params)
        params = best[1]
    else:
        params = _fit(x, y, len(classes), _DEFAULT_L2)
    preds = predict(params, test_texts)
    return {"accuracy": accuracy(preds, test_labels), "macro_f1": macro_f1(preds, test_labels)}


def majority_answer_baseline(train_targets: Sequence[str], test_targets: Sequence[str]) -> dict:
    answer = _majority(train_targets)
    preds = [answer] * len(test_targets)
    return {"exact_match": exact_match(preds, test_targets), "token_f1": token_f1(preds, test_targets),
            "prediction": answer}


def majority_tag_baseline(train_tokens: Sequence[Sequence[str]], train_tags: Sequence[Sequence[str]],
                          test_tokens: Sequence[Sequence[str]], test_tags: Sequence[Sequence[str]]) -> dict:
    """Each word gets the tag it had most often in train ("O" if unseen): a memorised-gazetteer floor."""
    by_word: dict[str, Counter] = {}
    for words, tags in zip(train_tokens, train_tags):
        for word, tag in zip(words, tags):
            by_word.setdefault(word, Counter())[tag] += 1
    best = {w: _majority(list(c.elements())) for w, c in by_word.items()}
    preds = [[best.get(w, "O") for w in words] for words in test_tokens]
    flat_p = [t for seq in preds for t in seq]
    flat_g = [t for seq in test_tags for t in seq]
    return {"accuracy": accuracy(flat_p, flat_g), "f1": seqeval_f1(preds, test_tags)}


def task_baselines(task_type: str, splits: dict[str, list[dict]]) -> dict[str, dict]:
    """All baselines that fit ``task_type`` for records shaped like :func:`build_world_task`'s."""
    train, test, val = splits.get("train") or [], splits.get("test") or [], splits.get("validation") or []
    if not train or not test:
        raise DataError("task baselines need non-empty 'train' and 'test' splits")
    if task_type == "classification":
        def text(r: dict) -> str:
            return r["text"] + (" " + r["text_pair"] if r.get("text_pair") else "")

        return {
            "majority": majority_baseline([r["label"] for r in train], [r["label"] for r in test]),
            "bag_of_words": bow_logreg_baseline(
                [text(r) for r in train], [r["label"] for r in train], [text(r) for r in test],
                [r["label"] for r in test], [text(r) for r in val] or None, [r["label"] for r in val] or None),
        }
    if task_type == "text2text":
        return {"majority_answer": majority_answer_baseline([r["target"] for r in train], [r["target"] for r in test])}
    if task_type == "token_classification":
        return {"majority_tag": majority_tag_baseline([r["tokens"] for r in train], [r["tags"] for r in train],
                                                      [r["tokens"] for r in test], [r["tags"] for r in test])}
    raise ConfigError(f"unknown task type {task_type!r}; use classification, token_classification or text2text")
