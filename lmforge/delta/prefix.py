"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): ``n`` trained keys and values in front of every attention
layer's own, the backbone frozen.  The backbone's ``past_kv`` slot does the attending (:mod:`lmforge.models.slots`);
this module holds the prefix (:class:`Prefix`), sizes and initialises it.

Initialisation follows the paper's finding that prefixes started from *activations of real words* train
better than random ones: the frozen model reads ``n`` tokens -- sampled from the vocabulary (``prompt_init:
vocab``, the default) or the tokens of ``prompt_init_text`` -- and each layer's keys and values for them become
that layer's prefix.  ``random`` draws N(0, 0.02^2).  With ``prefix_projection`` (the paper's
reparameterisation) the MLP's input starts from the same tokens' embeddings and the MLP from its default init.

Where the prefix goes per family: decoders' attention layers, BERT's self-attention layers, T5's decoder
self-attention layers (PEFT's placement; the encoder and cross-attention are untouched).  Decoders' prefixes are
saved in PEFT's PREFIX_TUNING format (the table folded, ``prompt_embeddings [n, L * 2 * kv_dim]``), T5's and BERT's
in lmforge's; a prefix never merges (it is an extra input, not a weight change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.delta.config import DeltaConfig
from lmforge.delta.peft_format import (PROMPT_PREFIX, head_names, head_state, load_prompt_learning, prompt_table,
                                       task_type, virtual_tokens)
from lmforge.delta.registry import DeltaMethod, register
from lmforge.delta.surgery import backbone_of, slot_of, start_token_ids
from lmforge.models.families import family_of
from lmforge.models.slots import PAST_KV

SLOT_NAME = "prefix"  # the backbone's submodule: parameters ``prefix.table`` (or ``prefix.embedding``, ``.transform``)


class Prefix(nn.Module):
    """Per-layer key/value prefixes: ``prefix(batch_size, dtype) -> [(k, v)] * n_layers``, each ``[B, H_kv, n,
    head_dim]`` (the ``past_kv`` slot's contract).

    Plain: ``table [n, L * 2 * kv_dim]`` (PEFT's layout: layer ``l`` reads blocks ``2l`` (keys) and ``2l + 1``
    (values)) trains directly.  With ``projection`` (the paper's reparameterisation, more stable to train):
    ``embedding [n, d]`` -> Linear(d, projection) -> tanh -> Linear(projection, L * 2 * kv_dim), whose output
    :meth:`full_table` is the table (what PEFT's files hold).
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

    def forward(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t = self.full_table().to(dtype).view(self.n, 2 * self.n_layers, self.n_kv_heads, self.head_dim)
        t = t.permute(1, 2, 0, 3)  # [2L, H_kv, n, D]
        return [(t[2 * i].expand(batch_size, -1, -1, -1), t[2 * i + 1].expand(batch_size, -1, -1, -1))
                for i in range(self.n_layers)]

    def extra_repr(self) -> str:
        return (f"n={self.n}, layers={self.n_layers}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"
                + (f", projection={self.transform[0].out_features}" if self.transform is not None else ""))


# ---- per family: the sites and shape come from the family (``prefix_sites``, ``prefix_shape``) ----------------
# PEFT's PREFIX_TUNING holds decoders' prefixes; not t5's (PEFT cannot give each T5 decoder layer its own prefix:
# _t5_prefix_rows), not bert's (transformers' BERT shifts positions by the prefix length where lmforge keeps them,
# and its classifiers take no prefix)
_PEFT_KINDS = ("decoder",)


def prefix_shape(backbone: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the attention layers a prefix feeds."""
    return family_of(backbone).prefix_shape(backbone.config)


def _read(backbone: nn.Module, x: torch.Tensor) -> None:
    """One forward pass over ``x [1, n]`` (T5: the decoder reads it, over its own encoding)."""
    if family_of(backbone).kind == "encoder-decoder":
        backbone.decode(x, backbone.encode(x))
    else:
        backbone(x)


def _from_peft_t5(model: nn.Module, pc: dict[str, Any]) -> bool:
    """Whether a PEFT table must be re-ordered into lmforge's layout (:func:`_t5_prefix_rows`): PEFT's row order
    for T5 itself, so keyed by the family's name."""
    return model.config.family == "t5" and pc.get("num_transformer_submodules", 2) == 2


# ---- building ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def _activations(backbone: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Each layer's keys and values for the tokens ``ids [n]``, in PEFT's table layout ``[n, L * 2 * kv_dim]``."""
    L = prefix_shape(backbone)[0]
    k_site, v_site = family_of(backbone).prefix_sites
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
        _read(backbone, ids[None])
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
    backbone = backbone_of(model)
    if backbone.slot(PAST_KV) is not None:
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
    backbone.fill_slot(PAST_KV, SLOT_NAME, prefix)
    return prefix


def _prefix(model: nn.Module) -> Prefix | None:
    prefix = slot_of(model, PAST_KV)
    return prefix if isinstance(prefix, Prefix) else None


def _t5_prefix_rows(table: torch.Tensor, n_layers: int) -> torch.Tensor:
    """A PEFT T5 prefix table -> lmforge's layout (layer i's keys/values in blocks 2i, 2i + 1).

    PEFT (0.21) duplicates the table's ``2L`` key/value blocks for T5's two submodules and splits the result into
    ``L`` chunks of four (self k, self v, cross k, cross v; the cross pair is then dropped), so decoder layer ``i``
    reads block pair ``2i mod L``: with an even depth two layers share one pair and the other half of the table is
    never used.  Loading reproduces that assignment exactly; lmforge's own T5 prefixes give every layer its own
    pair and are therefore saved in lmforge's format."""
    n, width = table.shape
    blocks = table.view(n, 2 * n_layers, width // (2 * n_layers))
    order = [b for i in range(n_layers) for b in (2 * ((2 * i) % n_layers), 2 * ((2 * i) % n_layers) + 1)]
    return blocks[:, order].reshape(n, width)


class PrefixTuning(DeltaMethod):
    """``prefix``: per-layer key/value prefixes in the backbone's ``past_kv`` slot."""

    name = "prefix"
    order = 30  # before LoRA: the prefix's start (random or the base model's activations) comes first
    peft_type = "PREFIX_TUNING"
    # prefixes take large steps, as in Li & Liang (seed 0, 600 steps, the 2000-step GPT-2 on world sentiment:
    # 1e-2 -> 0.722, 2e-2 -> 0.814; benchmarks/RESULTS.md, "Per-method defaults")
    train_defaults = {"lr": 2e-2}

    def check(self, cfg: DeltaConfig, methods: list[str]) -> None:
        if "prompt" in methods:
            raise ConfigError("peft.method: use one of 'prefix' and 'prompt' (both add positions in front of the input)")

    def apply(self, model: nn.Module, cfg: DeltaConfig, tokenizer: Any) -> list[str]:
        add_prefix(model, cfg.num_virtual_tokens, cfg.prompt_init, cfg.prompt_init_text, tokenizer,
                   projection=cfg.prefix_projection, projection_size=cfg.encoder_hidden_size)
        return []

    def present(self, model: nn.Module) -> bool:
        return _prefix(model) is not None

    def owns(self, name: str) -> bool:
        return SLOT_NAME in name.split(".")

    def disable(self, model: nn.Module, cfg: DeltaConfig, off: bool) -> None:
        backbone_of(model).switch_slot(PAST_KV, SLOT_NAME, not off)

    # ---- PEFT's PREFIX_TUNING format --------------------------------------------------------------------------
    def peft_supported(self, model: nn.Module) -> bool:
        family = family_of(model)
        return family is not None and family.kind in _PEFT_KINDS

    def peft_files(self, model: nn.Module, cfg: DeltaConfig, base_model: str | None
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """PEFT's PREFIX_TUNING config: the table saved folded (``prefix_projection`` false, as PEFT saves it);
        ``num_attention_heads`` / ``token_dim`` are the key/value heads' (PEFT's layout for grouped-query
        attention)."""
        prefix = _prefix(model)
        config = {"peft_type": "PREFIX_TUNING", "task_type": task_type(model), "num_virtual_tokens": prefix.n,
                  "token_dim": prefix.n_kv_heads * prefix.head_dim, "num_attention_heads": prefix.n_kv_heads,
                  "num_layers": prefix.n_layers, "num_transformer_submodules": 1,
                  "encoder_hidden_size": model.config.d_model, "prefix_projection": False, "inference_mode": True,
                  "base_model_name_or_path": base_model, "modules_to_save": head_names(model)}
        return config, {"prompt_embeddings": prefix.full_table(), **head_state(model, PROMPT_PREFIX)}

    def config_from_peft(self, pc: dict[str, Any], where: str) -> DeltaConfig:
        return DeltaConfig(method="prefix", num_virtual_tokens=virtual_tokens(pc, where), prompt_init="random")

    def load_peft(self, model: nn.Module, state: dict[str, torch.Tensor], d: Path, pc: dict[str, Any]) -> None:
        """``prompt_embeddings [n, L * 2 * kv_dim]``, the folded table."""
        table = prompt_table(state, d)
        prefix = _prefix(model)
        want = (prefix.n, prefix.n_layers * 2 * prefix.n_kv_heads * prefix.head_dim)
        theirs = (pc.get("num_layers"), pc.get("num_attention_heads"), pc.get("token_dim"))
        ours = (prefix.n_layers, prefix.n_kv_heads, prefix.n_kv_heads * prefix.head_dim)
        if theirs != ours or tuple(table.shape) != want:
            raise ModelError(f"'{d}': a prefix for (layers, kv heads, token_dim) = {theirs}, shape {tuple(table.shape)}; "
                             f"this model needs {ours}, shape {want}; load it onto the model it was trained for")
        if _from_peft_t5(model, pc):
            table = _t5_prefix_rows(table, prefix.n_layers)
        load_prompt_learning(model, state, d, prefix.table, table[:want[0]])


register(PrefixTuning())
