"""Ladder side tuning on an lmforge backbone: build the side network (:mod:`lmforge.models.ladder`) at width
``d / reduction`` from the backbone's own blocks, pruned (the paper's default reduction factor is 8), and put it
in the backbone's ``ladder`` slot.  Decoders (gpt2, llama) and BERT; T5's encoder-decoder ladder is not built."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.core.errors import ConfigError
from lmforge.models.ladder import LadderSide, hidden_dims, prune_block, selection_, side_config


def add_ladder(model: nn.Module, reduction: int = 8) -> LadderSide:
    from lmforge.delta.prompt import backbone_of

    backbone = backbone_of(model)
    c = backbone.config
    if c.family not in ("gpt2", "llama", "bert"):
        raise ConfigError(f"peft.method 'ladder' works on gpt2, llama and bert models, not {c.family!r} (its "
                          f"encoder-decoder side network is not built); use lora, prefix or prompt for t5")
    if reduction < 1:
        raise ConfigError(f"peft.ladder_reduction={reduction} must be >= 1")
    cs = side_config(c, reduction)
    table = backbone.get_input_embeddings().weight
    kw = dict(device=table.device, dtype=table.dtype)
    if c.family == "bert":
        from lmforge.models.encoder import EncoderBlock

        with torch.device("meta"):
            blocks = nn.ModuleList(EncoderBlock(cs) for _ in range(c.n_layer))
        norm: nn.Module = nn.Identity()  # post-LN blocks: the last block's output is already normed
    else:
        from lmforge.models.decoder import Block

        with torch.device("meta"):
            blocks = nn.ModuleList(Block(cs, i) for i in range(c.n_layer))
        norm = type(backbone.norm)(cs.d_model, eps=c.norm_eps)
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
    backbone.ladder = side
    return side


def ladder_of(model: nn.Module) -> LadderSide | None:
    return getattr(getattr(model, "backbone", model), "ladder", None)
