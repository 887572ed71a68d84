"""Extra inputs that delta methods put in front of a frozen model: soft prompts (prompt tuning, Lester et al.
2021, arXiv:2104.08691) and per-layer key/value prefixes (prefix tuning, Li & Liang 2021, arXiv:2101.00190).

Soft prompts
------------

Every lmforge backbone (``DecoderLM``, ``EncoderLM``, ``EncoderDecoderLM``) has a ``soft_prompt`` slot, None
unless prompt tuning is applied (:mod:`lmforge.delta.prompt`).  With a prompt in the slot the backbone keeps
its interface, so heads, losses and the generation engines need no change:

* masks the caller passes cover the real tokens only; the ``n`` prompt positions are always attended;
* the prompt takes positions ``0..n-1`` and the real tokens follow (as in PEFT, where transformers counts
  positions over the prepended embeddings);
* decoders and BERT return the real tokens' hidden states only (``[B, T, d]``); a decoding cache holds the
  prompt's keys/values after the first call, so later calls prepend nothing;
* BERT's sequence classifier pools position 0 of the *full* sequence, the first prompt vector, as
  transformers + PEFT do (``EncoderLM.forward(..., keep_prompt=True)``);
* T5's encoder output keeps the prompt positions, so the decoder cross-attends to them (the prompt is the
  encoder's, as in Lester et al. and in PEFT's ``generate``).

Prefixes
--------
Every backbone also has a ``prefix`` slot: ``n`` trained keys and values per attention layer that every query
attends to, in PEFT's layout (a table ``[n, L * 2 * kv_dim]``; layer ``l`` reads blocks ``2l`` (keys) and
``2l + 1`` (values)).  Masks the caller passes cover the real tokens; the prefix is always attended.

* decoders: the prefix is a cache that is already ``n`` positions long (:class:`PrefixCache` in training,
  the decoding cache prefilled by ``new_cache``), so the real tokens take positions ``n..`` as in
  transformers + PEFT; keys are used as stored (no rotary embedding);
* BERT: every self-attention layer sees the prefix; the real tokens keep positions ``0..T-1``;
* T5: the decoder's self-attention layers, as a self-attention cache ``n`` long (PEFT's placement).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.cache import KVCache


def with_leading_ones(attention_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A real-token mask ``[B, S]`` -> ``[B, n + S]`` (the n extra positions always attended); None stays None."""
    if attention_mask is None:
        return None
    return torch.cat([attention_mask.new_ones(attention_mask.shape[0], n), attention_mask], dim=1)


class SoftPrompt(nn.Module):
    """``weight [n, d]``; ``prepend(x [B, T, d]) -> [B, n + T, d]``."""

    def __init__(self, n: int, d: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)  # the delta method re-initialises (vocabulary, text or random)

    def prepend(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.weight.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)

    def mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return with_leading_ones(attention_mask, self.n)

    def positions(self, position_ids: torch.Tensor, with_prompt: bool) -> torch.Tensor:
        """Real-token positions ``[b, T]`` -> shifted by ``n``, with the prompt's ``0..n-1`` in front when the
        prompt is part of this call."""
        shifted = position_ids + self.n
        if not with_prompt:
            return shifted
        own = torch.arange(self.n, device=position_ids.device, dtype=position_ids.dtype)
        return torch.cat([own.expand(position_ids.shape[0], -1), shifted], dim=1)

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.weight.shape[1]}"


class Prefix(nn.Module):
    """Per-layer key/value prefixes: ``kv(B, dtype) -> [(k, v)] * n_layers``, each ``[B, H_kv, n, head_dim]``.

    Plain: ``table [n, L * 2 * kv_dim]`` trains directly.  With ``projection`` (the paper's reparameterisation,
    more stable to train): ``embedding [n, d]`` -> Linear(d, projection) -> tanh -> Linear(projection,
    L * 2 * kv_dim); :meth:`fold` replaces it by the plain table it computes (done at save).
    """

    def __init__(self, n: int, n_layers: int, n_kv_heads: int, head_dim: int, *, d_model: int,
                 projection: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n, self.n_layers, self.n_kv_heads, self.head_dim = n, n_layers, n_kv_heads, head_dim
        width = n_layers * 2 * n_kv_heads * head_dim
        kw = dict(device=device, dtype=dtype)
        if projection:
            self.embedding = nn.Parameter(torch.empty(n, d_model, **kw))
            self.transform = nn.Sequential(nn.Linear(d_model, projection, **kw), nn.Tanh(),
                                           nn.Linear(projection, width, **kw))
            self.table = None
        else:
            self.table = nn.Parameter(torch.empty(n, width, **kw))
            self.embedding = self.transform = None
        self.reset_parameters()

    @property
    def projected(self) -> bool:
        return self.table is None

    def reset_parameters(self) -> None:  # the delta method re-initialises (from the model's own keys/values)
        for p in (self.table, self.embedding):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        if self.transform is not None:
            for m in self.transform:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    def full_table(self) -> torch.Tensor:
        """``[n, L * 2 * kv_dim]``: the prefixes in PEFT's layout."""
        return self.table if self.table is not None else self.transform(self.embedding)

    def kv(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t = self.full_table().to(dtype).view(self.n, 2 * self.n_layers, self.n_kv_heads, self.head_dim)
        t = t.permute(1, 2, 0, 3)  # [2L, H_kv, n, D]
        return [(t[2 * i].expand(batch_size, -1, -1, -1), t[2 * i + 1].expand(batch_size, -1, -1, -1))
                for i in range(self.n_layers)]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation by the table it computes (inference gives the same keys/values)."""
        if self.table is None:
            table = self.transform(self.embedding).detach().clone()
            self.embedding = self.transform = None
            self.table = nn.Parameter(table)

    def mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return with_leading_ones(attention_mask, self.n)

    def extra_repr(self) -> str:
        return (f"n={self.n}, layers={self.n_layers}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"
                + (f", projection={self.transform[0].out_features}" if self.transform is not None else ""))


class PrefixCache:
    """A training-time stand-in for :class:`lmforge.models.cache.KVCache` holding only the prefix: ``length`` is
    ``n``, ``update`` returns ``prefix + new`` keys/values without storing the new ones (one forward pass)."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.kv = kv
        self.length = kv[0][0].shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.kv[layer_idx]
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    def advance(self, n: int) -> None:  # nothing is stored
        pass


def prefilled(cache: "KVCache", prefix: Prefix, batch_size: int) -> "KVCache":
    """Write the prefix into a fresh decoding cache (its first ``n`` positions)."""
    for i, (k, v) in enumerate(prefix.kv(batch_size, cache.k[0].dtype)):
        cache.update(i, k, v)
    cache.advance(prefix.n)
    return cache
