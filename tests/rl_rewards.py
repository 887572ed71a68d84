"""Reward functions the RL tests name as ``module:function`` (``tests.rl_rewards:NAME``)."""

from __future__ import annotations

import math


def digits(prompt: str, answer: str, record: dict) -> float:
    """More digits, more reward: varied scores from a random model, so advantages (and gradients) are not 0."""
    return sum(c.isdigit() for c in answer) / 4.0 + 0.1 * len(answer.split())


def says_answer(prompt: str, answer: str, record: dict) -> float:
    return float(str(record["answer"]) in answer)


def raises(prompt: str, answer: str, record: dict) -> float:
    raise KeyError("score")


def not_finite(prompt: str, answer: str, record: dict) -> float:
    return math.nan
