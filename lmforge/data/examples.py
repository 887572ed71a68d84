"""Batch sources over encoded examples (fine-tuning): shuffled resumable epochs for training, fixed order for
evaluation.  The caller supplies ``collate`` (an objective's), so this knows nothing of what an example holds."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from lmforge.core.errors import ConfigError


class ExampleSource:
    """Shuffled epochs over encoded examples: ``next_batch(n)`` for the Trainer, resumable exactly.

    The order of epoch ``e`` is a permutation drawn from ``seed + e``, so a resumed run (which restores
    ``(epoch, position)``) sees the same batches as an uninterrupted one.
    """

    def __init__(self, examples: Sequence[Any], collate: Callable[[list[Any]], dict[str, torch.Tensor]],
                 seed: int = 0, shuffle: bool = True) -> None:
        if not examples:
            raise ConfigError("the training split is empty; add examples")
        self.examples, self.collate, self.seed, self.shuffle = list(examples), collate, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < n:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            take = self._order[self.pos:self.pos + n - len(picked)]
            picked.extend(self.examples[i] for i in take)
            self.pos += len(take)
        return self.collate(picked)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": len(self.examples)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if int(sd["n"]) != len(self.examples):
            raise ConfigError(f"the checkpoint was trained on {sd['n']} examples, this run has {len(self.examples)}; "
                              f"resume with the same task")
        self.epoch, self.pos = int(sd["epoch"]), int(sd["pos"])
        self._order = self._perm(self.epoch)


def batches(examples: Sequence[Any], collate: Callable, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Examples in order, ``batch_size`` at a time (evaluation)."""
    for i in range(0, len(examples), batch_size):
        yield collate(list(examples[i:i + batch_size]))
