"""Ladder side tuning (Sung et al. 2022, arXiv:2206.06522): a narrow side network beside a frozen backbone.

The backbone runs without building an autograd graph and hands over its hidden state before the first block
(``h_0``) and after every block (``h_1..h_L``).  The side network has the backbone's own block type at width
``d' = H * (head_dim // r)`` (every head kept, each narrowed; FFN ``d_ff // r``)::

    s = down_0(h_0)
    for i in range(L):                        # g_i = sigmoid(alpha_i / T), T = 0.1, alpha_i = 0 at start
        s = side_block_i(s)
        s = g_i * down_{i+1}(h_{i+1}) + (1 - g_i) * s
    out = final + up(side_norm(s))            # final: the backbone's normed output; up starts at zero

so backward and the saved activations only involve the side network, ``d/d'`` times narrower.  Unlike the
paper the up-projection is *added* to the backbone's output (and starts at zero): the frozen head then starts
from exactly the base model's predictions, which matters for LM heads; a new classifier learns from both.

Initialisation is the paper's "structural weight initialisation" by pruning, with weight magnitude
as the importance (the paper's Fisher scores need task data; magnitude needs none): the ``d'`` residual
dimensions whose word-embedding columns have the largest norm (one set for every layer, so the residual stream
lines up), per head the dims with the largest query+key (and, separately, value) row norms, per layer the FFN
units with the largest input-row norms.  Each side block is its backbone block's weights at those indices, and
each ``down`` starts as the selection of those residual dims, so at step 0 the side network computes a pruned
copy of the backbone (for Llama an approximate one: the side network's own rotary embedding pairs its dims
afresh, while the kept dims came from the backbone's rotary pairs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from lmforge.models.layers import Linear, RotaryEmbedding

TEMPERATURE = 0.1  # the paper's gate temperature


class LadderSide(nn.Module):
    """The side network: ``downs`` (L + 1), ``gates`` (L alphas), ``blocks`` (L), ``norm``, ``up``; ``config`` is
    the side width's model config (the backbone's with ``d_model``/``d_ff`` narrowed)."""

    def __init__(self, backbone_config: Any, side_config: Any, blocks: nn.ModuleList, norm: nn.Module) -> None:
        super().__init__()
        d, ds, L = backbone_config.d_model, side_config.d_model, len(blocks)
        self.config = side_config
        self.downs = nn.ModuleList(Linear(d, ds, bias=False) for _ in range(L + 1))
        self.gates = nn.Parameter(torch.zeros(L))
        self.blocks = blocks
        self.norm = norm
        self.up = Linear(ds, d, bias=False)
        nn.init.zeros_(self.up.weight)
        self.rotary = RotaryEmbedding(side_config.head_dim, side_config.rope_theta) \
            if getattr(side_config, "family", "") == "llama" else None

    def forward(self, hiddens: list[torch.Tensor], final: torch.Tensor,
                run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``hiddens``: the backbone's ``L + 1`` states ``[B, T, d]``; ``final``: its output; ``run_block(block,
        x)`` calls a side block with the backbone's masks -> ``[B, T, d]``."""
        dtype = self.up.weight.dtype
        s = self.downs[0](hiddens[0].to(dtype))
        for i, block in enumerate(self.blocks):
            s = run_block(block, s)
            g = torch.sigmoid(self.gates[i] / TEMPERATURE)
            s = g * self.downs[i + 1](hiddens[i + 1].to(dtype)) + (1 - g) * s
        return final + self.up(self.norm(s)).to(final.dtype)

    def extra_repr(self) -> str:
        return f"side_width={self.config.d_model}, temperature={TEMPERATURE}"


class LadderCache:
    """A decoding cache for a laddered decoder: the backbone's and the side network's key/value caches."""

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


# ---- structural initialisation -------------------------------------------------------------------------------

def side_config(config: Any, reduction: int) -> Any:
    """The backbone's config at the side width: every head kept, head_dim // r (even for RoPE), d_ff // r."""
    hd = config.head_dim
    hd_side = max(1, hd // reduction)
    if getattr(config, "family", "") == "llama":
        hd_side = max(2, hd_side - hd_side % 2)
    return dataclasses.replace(config, d_model=config.n_head * hd_side,
                               d_ff=max(1, config.ffn_dim // reduction))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def _head_dims(rows: torch.Tensor, heads: int, hd: int, hd_side: int) -> torch.Tensor:
    """Per head, the ``hd_side`` of its ``hd`` output rows with the largest score -> flat row indices."""
    per = rows.view(heads, hd)
    return torch.cat([h * hd + _top(per[h], hd_side) for h in range(heads)])


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().norm(dim=1)


# family -> (param name in a block) -> roles of its dims: "hid" residual, "ffn", "qk"/"kv_qk" query/key dims of the
# (query / key-value) heads, "v"/"o" value dims of the key-value heads / of every query head, "qkv" gpt2's fused
_ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt2": {"attn_norm.weight": ("hid",), "attn_norm.bias": ("hid",), "mlp_norm.weight": ("hid",),
             "mlp_norm.bias": ("hid",), "attn.c_attn.weight": ("qkv", "hid"), "attn.c_attn.bias": ("qkv",),
             "attn.c_proj.weight": ("hid", "o"), "attn.c_proj.bias": ("hid",), "mlp.c_fc.weight": ("ffn", "hid"),
             "mlp.c_fc.bias": ("ffn",), "mlp.c_proj.weight": ("hid", "ffn"), "mlp.c_proj.bias": ("hid",)},
    "llama": {"attn_norm.weight": ("hid",), "mlp_norm.weight": ("hid",), "attn.q_proj.weight": ("qk", "hid"),
              "attn.q_proj.bias": ("qk",), "attn.k_proj.weight": ("kv_qk", "hid"), "attn.k_proj.bias": ("kv_qk",),
              "attn.v_proj.weight": ("v", "hid"), "attn.v_proj.bias": ("v",), "attn.o_proj.weight": ("hid", "o"),
              "attn.o_proj.bias": ("hid",), "mlp.gate_proj.weight": ("ffn", "hid"), "mlp.up_proj.weight": ("ffn", "hid"),
              "mlp.down_proj.weight": ("hid", "ffn"), "mlp.gate_proj.bias": ("ffn",), "mlp.up_proj.bias": ("ffn",),
              "mlp.down_proj.bias": ("hid",)},
    "bert": {"attention.self.query.weight": ("qk", "hid"), "attention.self.query.bias": ("qk",),
             "attention.self.key.weight": ("kv_qk", "hid"), "attention.self.key.bias": ("kv_qk",),
             "attention.self.value.weight": ("v", "hid"), "attention.self.value.bias": ("v",),
             "attention.output.dense.weight": ("hid", "o"), "attention.output.dense.bias": ("hid",),
             "attention.output.LayerNorm.weight": ("hid",), "attention.output.LayerNorm.bias": ("hid",),
             "intermediate.dense.weight": ("ffn", "hid"), "intermediate.dense.bias": ("ffn",),
             "output.dense.weight": ("hid", "ffn"), "output.dense.bias": ("hid",),
             "output.LayerNorm.weight": ("hid",), "output.LayerNorm.bias": ("hid",)},
}
# the parameter whose rows rank the FFN units, and the q / k / v weights that rank head dims
_RANKERS = {"gpt2": ("mlp.c_fc.weight", None, None, None), "llama": ("mlp.up_proj.weight", "attn.q_proj.weight",
                                                                   "attn.k_proj.weight", "attn.v_proj.weight"),
            "bert": ("intermediate.dense.weight", "attention.self.query.weight", "attention.self.key.weight",
                     "attention.self.value.weight")}


@torch.no_grad()
def prune_block(side: nn.Module, block: nn.Module, family: str, hid: torch.Tensor, c: Any, cs: Any) -> None:
    """Copy ``block``'s weights at the most important indices into the narrower ``side`` block (same class)."""
    full = dict(block.named_parameters())
    H, Hkv = c.n_head, getattr(c, "kv_heads", c.n_head)
    hd, hds = c.head_dim, cs.head_dim
    ffn_name, q_name, k_name, v_name = _RANKERS[family]
    if family == "gpt2":
        d = c.d_model
        w = full["attn.c_attn.weight"]
        q_rows, k_rows, v_rows = w[:d], w[d:2 * d], w[2 * d:]
    else:
        q_rows, k_rows, v_rows = full[q_name], full[k_name], full[v_name]
    group = H // Hkv
    # query and key must keep the same dims within a head (their dot product); a kv head serves `group` q heads
    kv_score = _row_norms(k_rows).view(Hkv, hd) + _row_norms(q_rows).view(Hkv, group, hd).sum(1)
    kv_qk = _head_dims(kv_score.flatten(), Hkv, hd, hds)
    v = _head_dims(_row_norms(v_rows), Hkv, hd, hds)
    per_q = lambda idx: torch.cat([(h * hd) + (idx.view(Hkv, hds)[h // group] % hd) for h in range(H)])  # noqa: E731
    qk, o = per_q(kv_qk), per_q(v)
    index = {"hid": hid, "ffn": _top(_row_norms(full[ffn_name]), cs.ffn_dim), "qk": qk, "kv_qk": kv_qk, "v": v, "o": o}
    d = c.d_model
    index["qkv"] = torch.cat([qk, d + qk, 2 * d + o])  # gpt2: H == Hkv, so o is the v dims
    roles = _ROLES[family]
    for name, p in side.named_parameters():
        if name not in roles:
            raise KeyError(f"ladder: no pruning rule for side parameter '{name}' of a {family} block")
        src = full[name]
        for axis, role in enumerate(roles[name]):
            src = src.index_select(axis, index[role].to(src.device))
        p.copy_(src)


def hidden_dims(embedding: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` residual dims whose word-embedding columns have the largest norm (shared by every layer)."""
    return _top(embedding.detach().float().norm(dim=0), k)


@torch.no_grad()
def selection_(down: nn.Linear, hid: torch.Tensor) -> None:
    """``down`` as the 0/1 matrix that picks the residual dims ``hid``."""
    down.weight.zero_()
    down.weight[torch.arange(len(hid)), hid.to(down.weight.device)] = 1.0
