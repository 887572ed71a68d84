"""Task metrics and model-free baselines against small hand-computed cases."""

from __future__ import annotations

import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.eval.baselines import (
    bow_logreg_baseline,
    majority_answer_baseline,
    majority_baseline,
    task_baselines,
)
from lmforge.eval.task_metrics import (
    accuracy,
    bio_spans,
    exact_match,
    macro_f1,
    normalize_answer,
    seqeval_f1,
    token_f1,
)


def test_accuracy_and_input_errors() -> None:
    assert accuracy(["a", "b", "b", "a"], ["a", "b", "a", "a"]) == 0.75
    for metric in (accuracy, macro_f1, exact_match, token_f1, seqeval_f1):
        with pytest.raises(ValueError):
            metric([], [])
        with pytest.raises(ValueError):
            metric(["a"], ["a", "b"])


def test_macro_f1_hand_computed() -> None:
    preds, golds = ["a", "a", "b", "c"], ["a", "b", "b", "b"]
    # a: 2*1/(2+1) = 2/3; b: 2*1/(1+3) = 1/2; c: predicted but never gold = 0
    assert macro_f1(preds, golds) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # "d" has neither gold nor prediction: skipped, not a zero
    assert macro_f1(preds, golds, labels=["a", "b", "c", "d"]) == pytest.approx((2 / 3 + 1 / 2) / 3)
    assert macro_f1(preds, golds, labels=["a", "b"]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    # a gold class that is never predicted counts as 0
    assert macro_f1(["x", "x", "x"], ["x", "x", "y"]) == pytest.approx((2 * 2 / 5 + 0) / 2)
    assert macro_f1(["p", "q"], ["p", "q"]) == 1.0


def test_squad_answer_metrics() -> None:
    assert normalize_answer("  The Cat's   hat! ") == "cats hat"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert exact_match(["the Kalgate", "Kalgate."], ["Kalgate", "Dinholm"]) == 0.5
    # "red and blue" vs "blue": precision 1/3, recall 1 -> F1 1/2; empty vs empty counts as a match
    assert token_f1(["red and blue", "", "x"], ["blue", "", "y"]) == pytest.approx((0.5 + 1 + 0) / 3)
    assert token_f1(["x b b"], ["b b c"]) == pytest.approx(2 / 3)  # 2 common of 3 and 3


def test_seqeval_spans_and_f1() -> None:
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)}
    assert bio_spans(["O", "I-PER", "I-PER", "I-LOC"]) == {("PER", 1, 3), ("LOC", 3, 4)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-OBJ", "I-OBJ"]]
    # one type error (LOC vs ORG) and one boundary error (OBJ cut short): 1 of 3 right both ways
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-OBJ", "O"]]
    assert seqeval_f1(pred, gold) == pytest.approx(1 / 3)
    assert seqeval_f1([["O", "I-PER", "I-PER"]], [["O", "B-PER", "I-PER"]]) == 1.0  # I after O opens a chunk
    assert seqeval_f1([["B-PER", "O"]], [["B-PER", "I-PER"]]) == 0.0
    assert seqeval_f1([["O", "O"]], [["O", "O"]]) == 0.0  # seqeval: no chunks anywhere scores 0
    with pytest.raises(ValueError):
        seqeval_f1([["O"]], [["O", "O"]])


def test_majority_baselines() -> None:
    out = majority_baseline(["a", "a", "b"], ["a", "b"])
    assert out["prediction"] == "a" and out["accuracy"] == 0.5
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert majority_baseline(["b", "a"], ["a"])["prediction"] == "a"  # ties: smallest, order-free
    ans = majority_answer_baseline(["Kalgate", "4", "Kalgate"], ["the Kalgate", "Kalgate town", "5"])
    assert ans["prediction"] == "Kalgate" and ans["exact_match"] == pytest.approx(1 / 3)
    assert ans["token_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    with pytest.raises(DataError):
        majority_baseline([], ["a"])


def test_bow_logreg_learns_keywords_but_not_negation() -> None:
    pos = ["the food was good", "a good inn", "good people here", "lovely and good"]
    neg = ["the food was bad", "a bad inn", "bad people here", "awful and bad"]
    out = bow_logreg_baseline(pos + neg, ["pos"] * 4 + ["neg"] * 4, ["so good!", "Bad."], ["pos", "neg"],
                              val_texts=["good", "bad"], val_labels=["pos", "neg"])
    assert out["accuracy"] == 1.0 and out["macro_f1"] == 1.0
    # Negation flips the label but not the bag: no linear model fits all four (at most 3 of 4).
    texts = ["it was good", "it was not bad", "it was bad", "it was not good"]
    labels = ["pos", "pos", "neg", "neg"]
    assert bow_logreg_baseline(texts, labels, texts, labels)["accuracy"] <= 0.75
    assert bow_logreg_baseline(texts, labels, texts, labels) == bow_logreg_baseline(texts, labels, texts, labels)


def test_task_baselines_dispatch() -> None:
    cls = {"train": [{"text": "good", "text_pair": "x", "label": "pos"}, {"text": "bad", "label": "neg"}],
           "test": [{"text": "good", "label": "pos"}]}
    out = task_baselines("classification", cls)
    assert set(out) == {"majority", "bag_of_words"} and out["bag_of_words"]["accuracy"] == 1.0
    t2t = {"train": [{"input": "q", "target": "4"}], "test": [{"input": "q", "target": "4"}]}
    assert task_baselines("text2text", t2t)["majority_answer"]["exact_match"] == 1.0
    ner = {"train": [{"tokens": ["Alva", "Dorn", "lives"], "tags": ["B-PER", "I-PER", "O"]},
                     {"tokens": ["Alva", "sings"], "tags": ["B-PER", "O"]},
                     {"tokens": ["Alva", "sings"], "tags": ["O", "O"]}],
           "test": [{"tokens": ["Alva", "Dorn", "sings"], "tags": ["B-PER", "I-PER", "O"]},
                    {"tokens": ["Mira", "Dorn"], "tags": ["B-PER", "I-PER"]}]}
    # per-word majority: Alva -> B-PER (2 of 3), Dorn -> I-PER, unseen Mira -> O; "Dorn" alone then
    # opens a wrong one-word chunk: 1 right of 2 predicted, 2 gold -> F1 1/2; 4 of 5 tags right
    out = task_baselines("token_classification", ner)["majority_tag"]
    assert out == {"accuracy": pytest.approx(4 / 5), "f1": pytest.approx(0.5)}
    with pytest.raises(ConfigError, match="task type"):
        task_baselines("regression", t2t)
    with pytest.raises(DataError):
        task_baselines("text2text", {"train": [], "test": t2t["test"]})
