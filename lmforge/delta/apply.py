"""Apply delta methods to a model by module-name patterns, without editing model code.

:func:`apply_delta` freezes the model, then (per ``DeltaConfig.methods``):

* ``lora`` / ``dora`` — every matched ``nn.Linear`` is replaced in place by a :class:`LoRALinear` that keeps
  the original weight and bias Parameters (state-dict keys unchanged) and trains only its low-rank branch;
* ``adapter`` — a bottleneck adapter after the attention and FFN sublayers (Houlsby; norms train too) or
  after the FFN only (Pfeiffer), by wrapping the Linear that ends each sublayer (:mod:`lmforge.delta.adapter`);
* ``ladder`` — a side network ``ladder_reduction`` times narrower, fed by the frozen backbone's hidden states
  (:mod:`lmforge.delta.ladder`);
* ``prefix`` — ``num_virtual_tokens`` keys/values in front of every attention layer's train
  (:mod:`lmforge.delta.prefix`);
* ``prompt`` — ``num_virtual_tokens`` soft-prompt vectors in front of the input embeddings train
  (:mod:`lmforge.delta.prompt`);
* ``bitfit`` — biases train (Ben Zaken et al. 2022, arXiv:2106.10199), and with ``bitfit_norms`` the norm gains;
* ``modules`` — the named modules train in full (the "specification" family: chosen layers or modules);
* the task head (``classifier``/``score``) trains unless ``train_head`` is off.

It works on any ``nn.Module`` with ``nn.Linear`` layers: module paths are matched as PEFT matches them, and
for lmforge models also against the transformers path (:func:`lmforge.delta.names.hf_path`), so a PEFT
regex written for the transformers model selects the same layers here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.delta.adapter import ADAPTER_SITES, AdapterLinear
from lmforge.delta.config import DEFAULT_TARGETS, DeltaConfig
from lmforge.delta.layer import DeltaLinear
from lmforge.delta.lora import LoRALinear
from lmforge.delta.ladder import add_ladder, ladder_of
from lmforge.delta.prefix import add_prefix, prefix_of
from lmforge.delta.prompt import add_soft_prompt, soft_prompt_of


@dataclass
class DeltaSummary:
    methods: list[str]
    trainable: int
    total: int
    targets: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def line(self) -> str:
        return (f"delta {'+'.join(self.methods)}: {self.trainable:,} trainable of {self.total:,} parameters "
                f"({self.percent:.3f}%)" + (f", {len(self.targets)} LoRA layers" if self.targets else "")
                + (f", {len(self.adapters)} adapters" if self.adapters else ""))


def family_of(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "family", None)


def _layer_index(path: str) -> int | None:
    m = re.search(r"(?:^|\.)(?:blocks|h|layers|layer|block)\.(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None


def matches(path: str, patterns: list[str] | str, alt_path: str | None = None) -> bool:
    """PEFT's rule: a list matches when the path equals an entry or ends with '.' + entry; a string is a regex
    that must match the whole path.  ``alt_path`` (the transformers path of the same module) is tried too."""
    paths = [path] + ([alt_path] if alt_path and alt_path != path else [])
    if isinstance(patterns, str):
        return any(re.fullmatch(patterns, p) for p in paths)
    return any(p == t or p.endswith("." + t) for p in paths for t in patterns)


def _hf_alt(model: nn.Module, path: str) -> str | None:
    from lmforge.delta.names import hf_path

    try:
        return hf_path(model, path)
    except Exception:  # not an lmforge model, or a module without a transformers equivalent
        return None


def _head_name(model: nn.Module) -> str | None:
    return getattr(model, "head_name", None)


def lora_targets(model: nn.Module, cfg: DeltaConfig) -> list[str]:
    """Module paths LoRA would wrap (``nn.Linear`` only; the task head and ``lm_head`` never)."""
    patterns = cfg.target_modules
    if patterns is None:
        fam = family_of(model)
        if fam not in DEFAULT_TARGETS:
            raise ConfigError(f"peft.target_modules is required for a model of family {fam!r} (no default); "
                              f"name the Linear layers to adapt, e.g. ['q_proj', 'v_proj']")
        patterns = DEFAULT_TARGETS[fam]
    head = _head_name(model)
    found, wrong_type = [], []
    for path, module in model.named_modules():
        if not path or path == head or path.endswith("lm_head"):
            continue
        if cfg.layers is not None and _layer_index(path) not in cfg.layers:
            continue
        if matches(path, patterns, _hf_alt(model, path)):
            (found if isinstance(module, nn.Linear) else wrong_type).append(path)
    if wrong_type and not found:
        raise ConfigError(f"peft.target_modules={patterns!r} matches {wrong_type[:3]}, which are not Linear layers; "
                          f"LoRA adapts Linear layers (e.g. {', '.join(DEFAULT_TARGETS.get(family_of(model) or '', []))})")
    if not found:
        raise ConfigError(f"peft.target_modules={patterns!r} matches no Linear layer of this model"
                          f"{'' if cfg.layers is None else f' in layers {cfg.layers}'}; Linear layers are named like "
                          f"{_linear_examples(model)}")
    return found


def _linear_examples(model: nn.Module) -> str:
    names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
    return ", ".join(names[:10])


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def apply_delta(model: nn.Module, cfg: DeltaConfig, tokenizer: Any = None) -> DeltaSummary | None:
    """Freeze ``model`` and add/unfreeze what ``cfg`` names (in place); None when no method is set.
    ``tokenizer``: needed only for a prompt initialised from text."""
    methods = cfg.methods
    if not methods:
        return None
    if any(isinstance(m, (LoRALinear, AdapterLinear)) for m in model.modules()) or soft_prompt_of(model) is not None \
            or prefix_of(model) is not None or ladder_of(model) is not None:
        raise ConfigError("this model already carries a delta (LoRA/adapter layers, a prompt, prefix or ladder); merge it "
                          "(merge_delta) or start from the base model before applying another")
    model.requires_grad_(False)
    if "prompt" in methods:
        add_soft_prompt(model, cfg.num_virtual_tokens, cfg.prompt_init, cfg.prompt_init_text, tokenizer)
    if "ladder" in methods:
        add_ladder(model, cfg.ladder_reduction)
    if "prefix" in methods:
        add_prefix(model, cfg.num_virtual_tokens, cfg.prompt_init, cfg.prompt_init_text, tokenizer,
                   projection=cfg.prefix_projection, projection_size=cfg.encoder_hidden_size)
    targets: list[str] = []
    if "lora" in methods or "dora" in methods:
        targets = lora_targets(model, cfg)
        for path in targets:
            base = model.get_submodule(path)
            _set_module(model, path, LoRALinear.wrap(base, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                                                     rslora=cfg.rslora, dora="dora" in methods))
        for path in targets:
            layer = model.get_submodule(path)
            for name in ("lora_A", "lora_B"):
                getattr(layer, name).requires_grad_(True)
            if layer.dora:
                layer.lora_magnitude_vector.requires_grad_(True)
    adapters: list[str] = []
    if "adapter" in methods:
        adapters = adapter_targets(model, cfg)
        d_model = model.get_submodule(adapters[0]).out_features
        size = cfg.adapter_size or max(1, d_model // cfg.reduction_factor)
        for path in adapters:
            layer = AdapterLinear.wrap(model.get_submodule(path), bottleneck=size)
            _set_module(model, path, layer)
            layer.adapter_down.requires_grad_(True)
            layer.adapter_up.requires_grad_(True)
        if cfg.adapter_type == "houlsby":  # Houlsby et al. §2.1: the layer norms are trained as well
            for module in model.modules():
                if _is_norm(module):
                    module.requires_grad_(True)
    if "bitfit" in methods:
        n = 0
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if pname == "bias" or (cfg.bitfit_norms and _is_norm(module)):
                    p.requires_grad_(True)
                    n += 1
        if n == 0:
            raise ConfigError("peft.method 'bitfit' found no bias in this model (llama and T5 have none); set "
                              "peft.bitfit_norms=true to train the norm gains, or use lora")
    if "modules" in methods:
        hit = [p for p, _ in model.named_modules() if p and matches(p, cfg.train_modules, _hf_alt(model, p))]
        if not hit:
            raise ConfigError(f"peft.train_modules={cfg.train_modules!r} matches no module of this model")
        inside = [p for p in hit if "pooler" not in p.split(".")]
        if "ladder" in methods and inside:
            raise ConfigError(f"peft.train_modules matches '{inside[0]}', which the ladder's frozen backbone pass "
                              f"runs without gradients; with ladder only BERT's pooler (after that pass) can train")
        for p in hit:
            model.get_submodule(p).requires_grad_(True)
    head = _head_name(model)
    if head and cfg.train_head:
        getattr(model, head).requires_grad_(True)
    params = {id(p): p for p in model.parameters()}.values()
    return DeltaSummary(methods, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params),
                        targets, adapters)


def _is_norm(module: nn.Module) -> bool:
    # leaf modules only: bert's DenseLayerNorm holds a Linear beside its LayerNorm
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or (
        not any(True for _ in module.children()) and "norm" in type(module).__name__.lower())


def adapter_targets(model: nn.Module, cfg: DeltaConfig) -> list[str]:
    """The Linear layers ending the sublayers an adapter follows (attention and FFN for Houlsby, FFN for
    Pfeiffer), from ``ADAPTER_SITES``, or ``adapter_modules`` when set."""
    fam = family_of(model)
    if cfg.adapter_modules is not None:
        sites = [cfg.adapter_modules]
    elif fam in ADAPTER_SITES:
        attn, ffn = ADAPTER_SITES[fam]
        sites = [attn, ffn] if cfg.adapter_type == "houlsby" else [ffn]
    else:
        raise ConfigError(f"peft.adapter_modules is required for adapters on a model of family {fam!r}: name the "
                          f"Linear layers whose outputs the adapters follow")
    found = []
    for path, module in model.named_modules():
        if path and isinstance(module, nn.Linear) and not path.endswith("lm_head") and path != _head_name(model) \
                and (cfg.layers is None or _layer_index(path) in cfg.layers) \
                and any(matches(path, s, _hf_alt(model, path)) for s in sites):
            found.append(path)
    if not found:
        raise ConfigError(f"peft: no Linear layer for adapters matches {sites!r}; Linear layers are named like "
                          f"{_linear_examples(model)}")
    _refuse_twice(model, found, "adapter")
    return found


def _refuse_twice(model: nn.Module, paths: list[str], method: str) -> None:
    taken = [p for p in paths if isinstance(model.get_submodule(p), DeltaLinear)]
    if taken:
        raise ConfigError(f"peft: {taken[:2]} already carry a LoRA layer; give {method} other layers "
                          f"(peft.adapter_modules / peft.target_modules)")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def mergeable(model: nn.Module) -> bool:
    """True when :func:`merge_delta` can give back the original architecture (no adapters: they are nonlinear;
    no soft prompt, prefix or side network: they are extra inputs or modules, not weight changes)."""
    return (not any(isinstance(m, AdapterLinear) for m in model.modules()) and soft_prompt_of(model) is None
            and prefix_of(model) is None and ladder_of(model) is None)


def merge_delta(model: nn.Module) -> nn.Module:
    """Bake every LoRA/DoRA layer into a plain Linear (in place): the model then has its original structure and
    saves as an ordinary checkpoint.  BitFit / trained modules already live in the base weights.  Adapters
    cannot be merged (a ModelError)."""
    if not mergeable(model):
        raise ModelError("bottleneck adapters, soft prompts, prefixes and ladders cannot be merged into the base weights; load the base "
                         "and apply the delta with lmforge (load_delta) instead")
    for path, layer in lora_layers(model).items():
        _set_module(model, path, layer.to_linear())
    return model


def trainable_state(model: nn.Module) -> dict[str, Any]:
    """Name -> tensor of the parameters that train (the delta and the head), by lmforge name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
