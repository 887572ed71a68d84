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

The ``ladder`` method fills the backbone's ``side`` slot (:mod:`lmforge.models.slots`) on decoders (gpt2, llama) and
BERT; T5's encoder-decoder ladder is not built.  It stands alone (nothing inside the frozen pass can train), saves
in lmforge's format and never merges (the side network is an extra module, not a weight change).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.delta.config import DeltaConfig
from lmforge.delta.registry import DeltaMethod, register
from lmforge.delta.surgery import backbone_of, slot_of
from lmforge.models.cache import KVCache
from lmforge.models.encoder import EncoderBlock
from lmforge.models.layers import Linear, RotaryEmbedding
from lmforge.models.slots import SIDE

SLOT_NAME = "ladder"  # the backbone's submodule: parameters ``ladder.downs.0.weight`` ...
TEMPERATURE = 0.1  # the paper's gate temperature

# ---- per family, by name (the one place): pruning a block needs the layout of its parameters, which a Family ----
# does not describe (``_ROLES``, ``_RANKERS`` below), so ladder knows these three families and refuses the others
_FAMILIES = ("gpt2", "llama", "bert")


def _rotary(config: Any) -> bool:
    """Whether the side network has a rotary embedding of its own (llama: RoPE, so an even head dim)."""
    return getattr(config, "family", "") == "llama"


def _side_blocks(backbone: nn.Module, cs: Any) -> tuple[nn.ModuleList, nn.Module]:
    """The side network's blocks (the backbone's block type at the side width, on meta) and final norm."""
    c = backbone.config
    if c.family == "bert":
        with torch.device("meta"):
            blocks = nn.ModuleList(EncoderBlock(cs) for _ in range(c.n_layer))
        return blocks, nn.Identity()  # post-LN blocks: the last block's output is already normed
    with torch.device("meta"):
        blocks = nn.ModuleList(backbone.block_class(cs, i) for i in range(c.n_layer))
    return blocks, type(backbone.norm)(cs.d_model, eps=c.norm_eps)


def _qkv_rows(full: dict[str, torch.Tensor], family: str, c: Any) -> tuple[torch.Tensor, ...]:
    """A block's query, key and value weights (gpt2's fused c_attn holds all three)."""
    if family == "gpt2":
        d = c.d_model
        w = full["attn.c_attn.weight"]
        return w[:d], w[d:2 * d], w[2 * d:]
    _, q_name, k_name, v_name = _RANKERS[family]
    return full[q_name], full[k_name], full[v_name]


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


# ---- the side network ----------------------------------------------------------------------------------------

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
        self.rotary = RotaryEmbedding(side_config.head_dim, side_config.rope_theta) if _rotary(side_config) else None

    def forward(self, hiddens: list[torch.Tensor], final: torch.Tensor,
                run_block: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor],
                position_ids: torch.Tensor) -> torch.Tensor:
        """``hiddens``: the backbone's ``L + 1`` states ``[B, T, d]``; ``final``: its output; ``run_block(block,
        x, rope)`` calls a side block with the backbone's masks -> ``[B, T, d]`` (the ``side`` slot's contract)."""
        rope = self.rotary(position_ids, hiddens[0].dtype) if self.rotary is not None else None
        dtype = self.up.weight.dtype
        s = self.downs[0](hiddens[0].to(dtype))
        for i, block in enumerate(self.blocks):
            s = run_block(block, s, rope)
            g = torch.sigmoid(self.gates[i] / TEMPERATURE)
            s = g * self.downs[i + 1](hiddens[i + 1].to(dtype)) + (1 - g) * s
        return final + self.up(self.norm(s)).to(final.dtype)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """The side blocks' decoding cache (decoders: the side network attends over the past too)."""
        cs = self.config
        return KVCache(cs.n_layer, batch_size, cs.kv_heads, cs.head_dim, max_len, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return f"side_width={self.config.d_model}, temperature={TEMPERATURE}"


# ---- structural initialisation -------------------------------------------------------------------------------

def side_config(config: Any, reduction: int) -> Any:
    """The backbone's config at the side width: every head kept, head_dim // r (even for RoPE), d_ff // r."""
    hd = config.head_dim
    hd_side = max(1, hd // reduction)
    if _rotary(config):
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


@torch.no_grad()
def prune_block(side: nn.Module, block: nn.Module, family: str, hid: torch.Tensor, c: Any, cs: Any) -> None:
    """Copy ``block``'s weights at the most important indices into the narrower ``side`` block (same class)."""
    full = dict(block.named_parameters())
    H, Hkv = c.n_head, getattr(c, "kv_heads", c.n_head)
    hd, hds = c.head_dim, cs.head_dim
    q_rows, k_rows, v_rows = _qkv_rows(full, family, c)
    group = H // Hkv
    # query and key must keep the same dims within a head (their dot product); a kv head serves `group` q heads
    kv_score = _row_norms(k_rows).view(Hkv, hd) + _row_norms(q_rows).view(Hkv, group, hd).sum(1)
    kv_qk = _head_dims(kv_score.flatten(), Hkv, hd, hds)
    v = _head_dims(_row_norms(v_rows), Hkv, hd, hds)
    per_q = lambda idx: torch.cat([(h * hd) + (idx.view(Hkv, hds)[h // group] % hd) for h in range(H)])  # noqa: E731
    qk, o = per_q(kv_qk), per_q(v)
    ffn = _top(_row_norms(full[_RANKERS[family][0]]), cs.ffn_dim)
    index = {"hid": hid, "ffn": ffn, "qk": qk, "kv_qk": kv_qk, "v": v, "o": o}
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


# ---- the method ----------------------------------------------------------------------------------------------

def add_ladder(model: nn.Module, reduction: int = 8) -> LadderSide:
    """Put a side network ``reduction`` times narrower than ``model``'s backbone, pruned from it, into its ``side``
    slot."""
    backbone = backbone_of(model)
    c = backbone.config
    if c.family not in _FAMILIES:
        raise ConfigError(f"peft.method 'ladder' works on gpt2, llama and bert models, not {c.family!r} (its "
                          f"encoder-decoder side network is not built); use lora, prefix or prompt for t5")
    if reduction < 1:
        raise ConfigError(f"peft.ladder_reduction={reduction} must be >= 1")
    cs = side_config(c, reduction)
    table = backbone.get_input_embeddings().weight
    kw = dict(device=table.device, dtype=table.dtype)
    blocks, norm = _side_blocks(backbone, cs)
    blocks.to_empty(device=kw["device"]).to(kw["dtype"])
    side = LadderSide(c, cs, blocks, norm).to(**kw)
    hid = hidden_dims(table, cs.d_model)
    for side_block, block in zip(side.blocks, backbone.blocks):
        prune_block(side_block, block, c.family, hid, c, cs)
    with torch.no_grad():
        for name, p in norm.named_parameters():
            p.copy_(getattr(backbone.norm, name)[hid.to(p.device)])
        for down in side.downs:
            selection_(down, hid)
    backbone.fill_slot(SIDE, SLOT_NAME, side)
    return side


class Ladder(DeltaMethod):
    """``ladder``: a side network in the backbone's ``side`` slot."""

    name = "ladder"
    order = 10
    # the side network starts from scratch and takes larger steps (seed 0, 600 steps, the 2000-step GPT-2 on world
    # sentiment: 5e-3 -> 0.702, 1e-2 -> 0.712; benchmarks/RESULTS.md, "Per-method defaults")
    train_defaults = {"lr": 1e-2}

    def check(self, cfg: DeltaConfig, methods: list[str]) -> None:
        if set(methods) - {"ladder", "modules"}:
            raise ConfigError(f"peft.method='{cfg.method}': ladder side tuning stands alone (the backbone runs "
                              f"without gradients, so nothing inside it can train); drop the other methods")

    def apply(self, model: nn.Module, cfg: DeltaConfig, tokenizer: Any) -> list[str]:
        add_ladder(model, cfg.ladder_reduction)
        return []

    def present(self, model: nn.Module) -> bool:
        return isinstance(slot_of(model, SIDE), LadderSide)

    def owns(self, name: str) -> bool:
        return SLOT_NAME in name.split(".")

    def disable(self, model: nn.Module, cfg: DeltaConfig, off: bool) -> None:
        backbone_of(model).switch_slot(SIDE, SLOT_NAME, not off)


register(Ladder())
