"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): ``n`` trained keys and values in front of every attention
layer's own, the backbone frozen.  The backbone's ``prefix`` slot does the attending
(:class:`lmforge.models.prompt.Prefix`); this module sizes and initialises it.

Initialisation follows the paper's finding that prefixes started from *activations of real words* train
better than random ones: the frozen model reads ``n`` tokens -- sampled from the vocabulary (``prompt_init:
vocab``, the default) or the tokens of ``prompt_init_text`` -- and each layer's keys and values for them become
that layer's prefix.  ``random`` draws N(0, 0.02^2).  With ``prefix_projection`` (the paper's
reparameterisation) the MLP's input starts from the same tokens' embeddings and the MLP from its default init.

Where the prefix goes per family: decoders' attention layers, BERT's self-attention layers, T5's decoder
self-attention layers (PEFT's placement; the encoder and cross-attention are untouched).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.models.prompt import Prefix

# family -> (module path of layer i's key output, of its value output); gpt2's fused c_attn holds both.
_KV_SITES = {"gpt2": ("blocks.{i}.attn.c_attn", None), "llama": ("blocks.{i}.attn.k_proj", "blocks.{i}.attn.v_proj"),
             "bert": ("blocks.{i}.attention.self.key", "blocks.{i}.attention.self.value"),
             "t5": ("decoder.blocks.{i}.self_attn.k", "decoder.blocks.{i}.self_attn.v")}


def prefix_shape(backbone: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the attention layers a prefix feeds."""
    c = backbone.config
    if c.family == "t5":
        return c.decoder_layers, c.num_heads, c.d_kv
    if c.family == "bert":
        return c.n_layer, c.n_head, c.head_dim
    return c.n_layer, c.kv_heads, c.head_dim


@torch.no_grad()
def _activations(backbone: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Each layer's keys and values for the tokens ``ids [n]``, in PEFT's table layout ``[n, L * 2 * kv_dim]``."""
    fam = backbone.config.family
    L = prefix_shape(backbone)[0]
    k_site, v_site = _KV_SITES[fam]
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for i in range(L):
        for site in (k_site, v_site):
            if site is None:
                continue
            path = site.format(i=i)
            hooks.append(backbone.get_submodule(path).register_forward_hook(
                lambda _m, _a, out, path=path: seen.__setitem__(path, out[0].detach())))
    was_training = backbone.training
    backbone.eval()
    try:
        x = ids[None]
        if fam == "t5":
            backbone.decode(x, backbone.encode(x))
        else:
            backbone(x)
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    blocks = []
    for i in range(L):
        if v_site is None:  # gpt2: c_attn gives [q | k | v]
            qkv = seen[k_site.format(i=i)]
            d = qkv.shape[-1] // 3
            blocks += [qkv[:, d:2 * d], qkv[:, 2 * d:]]
        else:
            blocks += [seen[k_site.format(i=i)], seen[v_site.format(i=i)]]
    return torch.stack(blocks, dim=1).reshape(ids.shape[0], -1)  # [n, 2L, kv_dim] -> [n, L * 2 * kv_dim]


def add_prefix(model: nn.Module, n: int, init: str = "vocab", text: str | None = None, tokenizer: Any = None,
               projection: bool = False, projection_size: int | None = None) -> Prefix:
    """Put trainable ``n``-position key/value prefixes into ``model``'s backbone, initialised by ``init``."""
    from lmforge.delta.prompt import backbone_of, start_token_ids

    backbone = backbone_of(model)
    if backbone.prefix is not None:
        raise ConfigError("this model already carries a prefix; start from the base model")
    if n < 1:
        raise ConfigError(f"peft.num_virtual_tokens={n} must be >= 1")
    if init not in ("vocab", "text", "random"):
        raise ConfigError(f"peft.prompt_init={init!r}; valid: vocab, text, random")
    layers, heads, head_dim = prefix_shape(backbone)
    table = backbone.get_input_embeddings().weight  # [V, d]
    d = table.shape[1]
    width = projection_size or d
    if projection and width < 1:
        raise ConfigError(f"peft.encoder_hidden_size={projection_size} must be >= 1")
    prefix = Prefix(n, layers, heads, head_dim, d_model=d, projection=width if projection else None,
                    device=table.device, dtype=table.dtype)
    if init != "random":
        ids = start_token_ids(n, init, text, tokenizer, table.shape[0], table.device)
        with torch.no_grad():
            if projection:
                prefix.embedding.copy_(table[ids])
            else:
                prefix.table.copy_(_activations(backbone, ids))
    backbone.prefix = prefix
    return prefix


def prefix_of(model: nn.Module) -> Prefix | None:
    return getattr(getattr(model, "backbone", model), "prefix", None)
