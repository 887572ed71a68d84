"""Slots: where a delta method adds inputs or a network to a frozen backbone without a model subclass.

A backbone (``DecoderLM``, ``EncoderLM``, ``EncoderDecoderLM``) is a :class:`SlotHost`: it names the slot kinds it
has (``slot_kinds``), ``slot(kind)`` gives the module filling one (None when empty), and its forward knows each
kind's contract, never the method behind it.  A delta method (``lmforge.delta``) fills a slot with
``backbone.fill_slot(kind, name, module)``: the module becomes the backbone's submodule ``name``, so its parameters
are saved as ``name.*`` (``soft_prompt.weight``, ``prefix.table``, ``ladder.up.weight``).

``input`` -- ``n`` vectors in front of the input embeddings (prompt tuning): the module has ``n`` and
``module(batch_size, dtype) -> [B, n, d]``.  The backbone keeps its interface, so heads, losses and the generation
engines need no change:

* masks the caller passes cover the real tokens only; the ``n`` positions are always attended;
* the vectors take positions ``0..n-1`` and the real tokens follow (as in PEFT, where transformers counts
  positions over the prepended embeddings);
* decoders and BERT return the real tokens' hidden states only (``[B, T, d]``); a decoding cache holds the
  vectors' keys/values after the first call, so later calls prepend nothing;
* BERT's sequence classifier pools position 0 of the *full* sequence, the first vector, as transformers + PEFT do
  (``EncoderLM.forward(..., keep_prompt=True)``);
* T5's encoder output keeps the ``n`` positions, so the decoder cross-attends to them (the encoder's input, as in
  Lester et al. and in PEFT's ``generate``).

``past_kv`` -- ``n`` keys and values per attention layer that every query attends to (prefix tuning): the module has
``n`` and ``module(batch_size, dtype) -> [(k, v)] * layers``, each ``[B, H_kv, n, head_dim]``.  Masks the caller
passes cover the real tokens; the ``n`` positions are always attended.

* decoders: a cache that is already ``n`` positions long (:class:`PrefixCache` in training, the decoding cache
  prefilled by ``new_cache``), so the real tokens take positions ``n..`` as in transformers + PEFT; keys are used as
  stored (no rotary embedding);
* BERT: every self-attention layer; the real tokens keep positions ``0..T-1``;
* T5: the decoder's self-attention layers, as a self-attention cache ``n`` long (PEFT's placement).

``side`` -- a network beside the frozen blocks (ladder side tuning; decoders and BERT): the blocks run without an
autograd graph, then ``module(hiddens, final, run_block, position_ids) -> output`` gets the state before the first
block and after each (``L + 1`` tensors ``[B, T, d]``), the normed output ``final``, and ``run_block(block, x,
rope)``, which calls one of the side network's blocks (the backbone's block type) with the backbone's masks (and
the side network's own cache when decoding); ``module.new_cache(batch_size, max_len, dtype, device)`` gives that
cache (decoders: :class:`SideCache` holds both).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.models.cache import KVCache

INPUT, PAST_KV, SIDE = "input", "past_kv", "side"


class SlotHost(nn.Module):
    """A module with delta-method slots: ``slot_kinds`` (class attribute), ``slot(kind)``, ``fill_slot``."""

    slot_kinds: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.slot_names: dict[str, str] = {}  # kind -> the submodule filling it

    def slot(self, kind: str) -> nn.Module | None:
        name = self.slot_names.get(kind)
        return None if name is None else getattr(self, name)

    def fill_slot(self, kind: str, name: str, module: nn.Module) -> None:
        if kind not in self.slot_kinds:
            raise ValueError(f"{type(self).__name__} has no '{kind}' slot (it has {', '.join(self.slot_kinds)})")
        if self.slot(kind) is not None:
            raise ValueError(f"the '{kind}' slot of this {type(self).__name__} is taken")
        self.add_module(name, module)
        self.slot_names[kind] = name

    def switch_slot(self, kind: str, name: str, on: bool) -> None:
        """Empty slot ``kind`` (its module stays the submodule ``name``, trained state and all) or put it back."""
        if on:
            self.slot_names[kind] = name
        else:
            self.slot_names.pop(kind, None)


def with_leading_ones(attention_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A real-token mask ``[B, S]`` -> ``[B, n + S]`` (the n extra positions always attended); None stays None."""
    if attention_mask is None:
        return None
    return torch.cat([attention_mask.new_ones(attention_mask.shape[0], n), attention_mask], dim=1)


def prepend(front: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``input`` slot's vectors in front of ``x [B, T, d]`` -> ``[B, n + T, d]``."""
    return torch.cat([front(x.shape[0], x.dtype), x], dim=1)


def shifted_positions(position_ids: torch.Tensor, n: int, with_front: bool) -> torch.Tensor:
    """Real-token positions ``[b, T]`` -> shifted by ``n``, with the ``input`` slot's ``0..n-1`` in front when its
    vectors are part of this call."""
    shifted = position_ids + n
    if not with_front:
        return shifted
    own = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype)
    return torch.cat([own.expand(position_ids.shape[0], -1), shifted], dim=1)


class PrefixCache:
    """A training-time stand-in for :class:`lmforge.models.cache.KVCache` holding only the ``past_kv`` slot's keys and
    values: ``length`` is ``n``, ``update`` returns ``prefix + new`` without storing the new ones (one forward pass)."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.kv = kv
        self.length = kv[0][0].shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.kv[layer_idx]
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)

    def advance(self, n: int) -> None:  # nothing is stored
        pass


def prefilled(cache: KVCache, past_kv: nn.Module, batch_size: int) -> KVCache:
    """Write the ``past_kv`` slot's keys/values into a fresh decoding cache (its first ``n`` positions)."""
    for i, (k, v) in enumerate(past_kv(batch_size, cache.k[0].dtype)):
        cache.update(i, k, v)
    cache.advance(past_kv.n)
    return cache


class SideCache:
    """A decoding cache for a decoder with a ``side`` network: the backbone's and the side network's caches."""

    def __init__(self, main: Any, side: Any) -> None:
        self.main, self.side = main, side

    @property
    def length(self) -> int:
        return self.main.length

    def advance(self, n: int) -> None:
        self.main.advance(n)
        self.side.advance(n)

    def reorder(self, index: torch.Tensor) -> None:
        self.main.reorder(index)
        self.side.reorder(index)

    def reset(self) -> None:
        self.main.reset()
        self.side.reset()
