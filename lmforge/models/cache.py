"""A static key/value cache for incremental decoding.

Preallocated per layer as ``[batch, n_kv_heads, max_len, head_dim]`` so decoding never reallocates or
concatenates (``torch.cat`` per token is what makes naive generation loops slow).  All rows of a batch
share one write position: prompts of different lengths are *left*-padded by the generation engine, and
the padding is hidden by the attention mask, not by per-row positions in the cache.

Usage inside a model's forward (``T`` new tokens)::

    k_all, v_all = cache.update(layer_idx, k, v)   # k, v: [B, H_kv, T, D] -> [B, H_kv, length + T, D]
    ...
    cache.advance(T)                               # once, after the last layer

``cache.length`` is the number of positions already stored before this forward.
"""

from __future__ import annotations

import torch

from lmforge.core.errors import ModelError


class CacheOverflowError(ModelError, ValueError):
    """More positions written than the cache was created for (``max_len``)."""


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (``[B, H_kv, T, D]``) at the current position; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise CacheOverflowError(
                f"KV cache overflow: {end} positions > max_len {self.max_len}; create the cache with a larger "
                f"max_len (prompt length + new tokens)")
        self.k[layer_idx][:, :, self.length:end] = k
        self.v[layer_idx][:, :, self.length:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only/duplicate rows ``index`` (e.g. drop finished sequences, beam search)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]

    def reset(self) -> None:
        self.length = 0
