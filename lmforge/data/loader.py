"""Packed windows over a token stream: the pretraining batch source (resumable, deterministic).

The stream (documents already separated by EOS, see :mod:`lmforge.data.shards`) is cut into
``num_windows = (len(tokens) - 1) // seq_len`` windows of ``seq_len + 1`` tokens starting at multiples
of ``seq_len``; window ``i`` gives ``input_ids = tokens[i*L : i*L+L]`` and
``labels = tokens[i*L+1 : i*L+L+1]``.  Consecutive windows share one token, so every token after the
first is a target exactly once per epoch.  The trailing tokens that do not fill a window are dropped.

The window order of epoch ``e`` is a permutation drawn from ``numpy.random.Generator(PCG64([seed, e]))``
(or ``0..num_windows-1`` with ``shuffle=False``): a function of seed and epoch only.  ``next_batch(n)``
takes the next ``n`` windows, crossing into the next epoch (and its new permutation) seamlessly.  The
position is two integers (epoch, index), so ``state_dict``/``load_state_dict`` resume exactly.

Several shards may be given as a list of arrays: windows are then cut within each shard (they never
straddle two files) and numbered shard after shard.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from lmforge.core.errors import ConfigError, DataError, RunError


class PackedWindows:
    """Batch source of packed ``seq_len`` windows: ``next_batch(n) -> {"input_ids", "labels"}`` (int64 [n, seq_len])."""

    def __init__(self, tokens: np.ndarray | Sequence[np.ndarray], seq_len: int, seed: int = 0,
                 shuffle: bool = True):
        if int(seq_len) < 1:
            raise ConfigError(f"seq_len {seq_len} must be >= 1")
        if int(seed) < 0:
            raise ConfigError(f"seed {seed} must be >= 0")
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        arrays = [tokens] if isinstance(tokens, np.ndarray) or torch.is_tensor(tokens) else list(tokens)
        self._arrays = [a.numpy() if torch.is_tensor(a) else a for a in arrays]
        for a in self._arrays:
            if a.ndim != 1:
                raise DataError(f"token stream must be 1-D, got shape {tuple(a.shape)}")
        counts = np.array([max(0, (len(a) - 1) // self.seq_len) for a in self._arrays], dtype=np.int64)
        self.num_windows = int(counts.sum())
        if self.num_windows == 0:
            n = sum(len(a) for a in self._arrays)
            raise DataError(f"the token stream has {n} tokens, too few for one window of seq_len {self.seq_len} "
                            f"(needs {self.seq_len + 1}); use more data or a shorter seq_len")
        # Window w lies in shard k when first[k] <= w < first[k + 1].
        self._first = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self._first[1:])
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)
        self.epoch = 0
        self.index = 0  # windows of the current epoch already taken
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    # ------------------------------------------------------------------ order and gather
    def order(self, epoch: int) -> np.ndarray:
        """Window order of ``epoch`` (int64 [num_windows])."""
        if self._order_epoch != epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, int(epoch)]))
                self._order = rng.permutation(self.num_windows).astype(np.int64)
            else:
                self._order = np.arange(self.num_windows, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def _gather(self, windows: np.ndarray) -> np.ndarray:
        """Tokens of the given windows: int64 [len(windows), seq_len + 1] (one fancy index per shard)."""
        if len(self._arrays) == 1:
            starts = windows * self.seq_len
            return self._arrays[0][starts[:, None] + self._offsets].astype(np.int64)
        out = np.empty((len(windows), self.seq_len + 1), dtype=np.int64)
        shard = np.searchsorted(self._first, windows, side="right") - 1
        for k in np.unique(shard):
            rows = np.nonzero(shard == k)[0]
            starts = (windows[rows] - self._first[k]) * self.seq_len
            out[rows] = self._arrays[k][starts[:, None] + self._offsets]
        return out

    @staticmethod
    def _batch(block: np.ndarray) -> dict[str, torch.Tensor]:
        t = torch.from_numpy(block)
        return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}

    # ------------------------------------------------------------------ batch source contract
    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        """The next ``n`` windows in the epoch's order, continuing into the next epoch when one ends."""
        if int(n) < 1:
            raise ConfigError(f"batch size {n} must be >= 1")
        parts = []
        need = int(n)
        while need > 0:
            order = self.order(self.epoch)
            take = min(need, self.num_windows - self.index)
            parts.append(order[self.index:self.index + take])
            self.index += take
            need -= take
            if self.index >= self.num_windows:
                self.epoch += 1
                self.index = 0
        windows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._batch(self._gather(windows))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": int(self.epoch), "index": int(self.index), "seed": int(self.seed),
                "seq_len": int(self.seq_len), "num_windows": int(self.num_windows)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at a saved position.  The saved seed is adopted so the order continues unchanged."""
        for key in ("epoch", "index", "seed", "seq_len", "num_windows"):
            if key not in sd:
                raise RunError(f"data loader state lacks '{key}'; the checkpoint is not from PackedWindows")
        if int(sd["seq_len"]) != self.seq_len:
            raise RunError(f"cannot resume: the checkpoint's data loader used seq_len {sd['seq_len']}, this run "
                           f"uses {self.seq_len}; set seq_len back to {sd['seq_len']} or start a new run")
        if int(sd["num_windows"]) != self.num_windows:
            raise RunError(f"cannot resume: the checkpoint's data had {sd['num_windows']} windows, this data has "
                           f"{self.num_windows}; resume with the same data and tokenizer or start a new run")
        if not 0 <= int(sd["index"]) < self.num_windows or int(sd["epoch"]) < 0:
            raise RunError(f"cannot resume: data loader position epoch={sd['epoch']} index={sd['index']} is out "
                           f"of range for {self.num_windows} windows")
        self.seed = int(sd["seed"])
        self.epoch = int(sd["epoch"])
        self.index = int(sd["index"])
        self._order_epoch = None

    # ------------------------------------------------------------------ extras
    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """All windows in stream order (no shuffle), ``batch_size`` at a time (the last may be smaller).

        Independent of the training position: calling it does not move ``next_batch``.
        """
        if int(batch_size) < 1:
            raise ConfigError(f"batch size {batch_size} must be >= 1")
        total = self.num_windows
        if max_batches is not None:
            total = min(total, int(max_batches) * int(batch_size))
        for start in range(0, total, int(batch_size)):
            windows = np.arange(start, min(start + int(batch_size), total), dtype=np.int64)
            yield self._batch(self._gather(windows))

    def num_val_batches(self, batch_size: int, max_batches: int | None = None) -> int:
        n = -(-self.num_windows // int(batch_size))
        return n if max_batches is None else min(n, int(max_batches))

    @property
    def tokens_per_epoch(self) -> int:
        """Targets per epoch: num_windows * seq_len."""
        return self.num_windows * self.seq_len

    def __len__(self) -> int:
        return self.num_windows
