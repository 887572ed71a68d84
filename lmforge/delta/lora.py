"""LoRA (Hu et al. 2021, arXiv:2106.09685) and DoRA (Liu et al. 2024, arXiv:2402.09353) on a Linear layer.

LoRA learns a low-rank update of a frozen weight ``W [out, in]``::

    y = x Wᵀ + b + s · B(A(dropout(x)))        A: [r, in],  B: [out, r],  s = alpha / r  (rsLoRA: alpha / √r)

``A`` starts Kaiming-uniform and ``B`` at zero, so training starts exactly at the base model.  Dropout acts
on the LoRA branch's input only.  rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by ``alpha / √r`` so
larger ranks keep learning.

DoRA splits the adapted weight into a magnitude ``m [out]`` and a direction::

    W' = W + s · B A          y = (m / ‖W'‖_row) ⊙ (x W'ᵀ) + b

with the row norm detached from the graph (paper §4.3, as PEFT does), ``m`` initialised to ``‖W‖_row``.

The layer *replaces* the Linear it adapts and keeps that Linear's ``weight``/``bias`` Parameters under their
own names, so a model's state-dict keys for the base weights do not change and the new ones read like
PEFT's (``...c_attn.lora_A.weight``, ``...c_attn.lora_magnitude_vector``).  ``merge()`` folds the update into
``weight`` (output unchanged within fp32 rounding), ``unmerge()`` takes it out again.

The ``lora`` and ``dora`` methods wrap every ``nn.Linear`` that ``target_modules`` matches (PEFT's default per
family when unset) and save in PEFT's LoRA format::

    adapter_config.json          peft_type LORA, task_type, r, lora_alpha, lora_dropout, use_rslora, use_dora,
                                 target_modules (leaf names), fan_in_fan_out (true for GPT-2's Conv1D),
                                 modules_to_save (the head, for classifiers)
    adapter_model.safetensors    base_model.model.<transformers path>.lora_A.weight  [r, in]
                                 base_model.model.<transformers path>.lora_B.weight  [out, r]
                                 base_model.model.<transformers path>.lora_magnitude_vector  [out]  (DoRA)
                                 base_model.model.score.weight / classifier.{weight,bias}   (classifiers)

PEFT's A/B are in ``nn.Linear`` layout even for GPT-2's Conv1D, as lmforge's are, so no transposes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.delta.apply import LORA_LAYERS
from lmforge.delta.config import DeltaConfig
from lmforge.delta.layer import DeltaLinear
from lmforge.delta.names import hf_path, lmforge_path
from lmforge.delta.peft_format import PEFT_PREFIX, copy_checked, head_names, head_state, task_type
from lmforge.delta.registry import DeltaMethod, register
from lmforge.delta.surgery import family_name, head_name, hf_alt, layer_index, linear_examples, matches, set_module
from lmforge.models.families import family_of
from lmforge.models.layers import Linear

def _fan_in_fan_out(model: nn.Module) -> bool:
    """PEFT's ``fan_in_fan_out``: the transformers model stores these weights ``[in, out]`` (GPT-2's Conv1D)."""
    family = family_of(model)
    return bool(family and family.fan_in_fan_out)


class LoRALinear(DeltaLinear):
    """A Linear with a LoRA (or DoRA) branch; built from the Linear it replaces with ``LoRALinear.wrap(linear, r=...)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, rslora: bool = False, dora: bool = False, std: float = 0.02,
                 device=None, dtype=None) -> None:
        if r < 1:
            raise ValueError(f"LoRA rank r={r} must be >= 1")
        super().__init__(in_features, out_features, bias, std=std, device=device, dtype=dtype)
        self.r, self.alpha, self.rslora, self.dora = int(r), float(alpha), bool(rslora), bool(dora)
        self.scaling = self.alpha / (math.sqrt(self.r) if self.rslora else self.r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, out_features, bias=False, device=device, dtype=dtype)
        if self.dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        self.merged = False
        self._merge_scale: torch.Tensor | None = None  # DoRA: m / ‖W'‖ at merge time, to unmerge exactly
        self.reset_delta()

    # ---- initialisation ---------------------------------------------------------------------------
    def reset_delta(self) -> None:
        """A ~ Kaiming-uniform(a=√5) (U(±1/√in), nn.Linear's default), B = 0; DoRA's m = ‖W‖_row."""
        if self.lora_A.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.dora:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self._adapted_weight().norm(dim=1))

    # ---- the math ---------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``s · B A``: the update in ``weight``'s ``[out, in]`` layout."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _adapted_weight(self) -> torch.Tensor:
        w = self.weight if not self.merged else self._unmerged_weight()
        return w + self.delta_weight()

    def _unmerged_weight(self) -> torch.Tensor:
        if not self.dora:
            return self.weight - self.delta_weight()
        return self.weight / self._merge_scale[:, None] - self.delta_weight()

    def fp32_units(self) -> list[nn.Module]:
        """Submodules FSDP may run in fp32 under a bf16 policy (lmforge/train/distributed.py): A and B, which only
        their own forward touches — not under DoRA, whose norm reads their weights directly."""
        return [] if self.dora else [self.lora_A, self.lora_B]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.delta_on:
            return super().forward(x)
        dx = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(dx)) * self.scaling
        if not self.dora:
            y = super().forward(x)
            return y + lora.to(y.dtype)  # an fp32 delta on a bf16 base adds in the base's dtype
        # DoRA: (m / ‖W + sBA‖) ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b, the norm detached (paper §4.3).  Written as
        # base(x) + (scale - 1) ⊙ dropout(x) Wᵀ + scale ⊙ lora so that, without dropout, it is exactly that,
        # and with dropout the dropped input feeds only the learned part (as PEFT does).
        with torch.no_grad():  # detached (no graph: nothing saved for a backward that never uses it)
            norm = self._adapted_weight().norm(dim=1)
        scale = self.lora_magnitude_vector / norm
        return super().forward(x) + (scale - 1) * F.linear(dx, self.weight) + scale * lora

    # ---- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight``: the forward then costs one matmul, output unchanged."""
        if self.merged:
            return
        if self.dora:
            adapted = self.weight + self.delta_weight()
            self._merge_scale = self.lora_magnitude_vector / adapted.norm(dim=1)
            self.weight.copy_(adapted * self._merge_scale[:, None])
        else:
            self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``weight`` again (exact up to fp32 rounding)."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight())
        self.merged, self._merge_scale = False, None

    def to_linear(self) -> Linear:
        """A plain Linear holding the merged weight (the LoRA branch baked in)."""
        self.merge()
        out = Linear.__new__(Linear)
        nn.Module.__init__(out)
        out.in_features, out.out_features, out.std = self.in_features, self.out_features, self.std
        out.weight, out.bias = self.weight, self.bias
        out.train(self.training)
        return out

    def extra_repr(self) -> str:
        kind = "DoRA" if self.dora else "LoRA"
        return (f"{super().extra_repr()}, {kind} r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"
                f"{', merged' if self.merged else ''}")


# ---- the methods ---------------------------------------------------------------------------------------------

def lora_targets(model: nn.Module, cfg: DeltaConfig) -> list[str]:
    """Module paths LoRA would wrap (``nn.Linear`` only; the task head and ``lm_head`` never)."""
    patterns = cfg.target_modules
    family = family_of(model)
    defaults = list(family.lora_targets) if family else []  # PEFT's default for the family
    if patterns is None:
        if not defaults:
            raise ConfigError(f"peft.target_modules is required for a model of family {family_name(model)!r} (no "
                              f"default); name the Linear layers to adapt, e.g. ['q_proj', 'v_proj']")
        patterns = defaults
    head = head_name(model)
    found, wrong_type = [], []
    for path, module in model.named_modules():
        if not path or path == head or path.endswith("lm_head"):
            continue
        if cfg.layers is not None and layer_index(path) not in cfg.layers:
            continue
        if matches(path, patterns, hf_alt(model, path)):
            (found if isinstance(module, nn.Linear) else wrong_type).append(path)
    if wrong_type and not found:
        raise ConfigError(f"peft.target_modules={patterns!r} matches {wrong_type[:3]}, which are not Linear layers; "
                          f"LoRA adapts Linear layers (e.g. {', '.join(defaults)})")
    if not found:
        raise ConfigError(f"peft.target_modules={patterns!r} matches no Linear layer of this model"
                          f"{'' if cfg.layers is None else f' in layers {cfg.layers}'}; Linear layers are named like "
                          f"{linear_examples(model)}")
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


class LoRA(DeltaMethod):
    """``lora`` (``dora=False``) and ``dora``: a LoRA / DoRA branch on every targeted Linear; merges."""

    order = 40  # after the slot methods (their random starts come first), before adapters (which refuse LoRA layers)
    counted_as = LORA_LAYERS
    peft_type = "LORA"
    # a tiny model takes larger steps than the papers' 1e-4..1e-3 (the 400-step pipeline GPT-2 on world sentiment,
    # 200-step runs: 1e-3 -> 0.52, 1e-2 -> 0.50, 5e-3 -> 0.79; a 400-step run at 5e-3 -> 0.984, the README's
    # example; benchmarks/RESULTS.md, "Per-method defaults"); DoRA likewise
    train_defaults = {"lr": 5e-3}

    def __init__(self, name: str, dora: bool) -> None:
        self.name, self.dora = name, dora

    def check(self, cfg: DeltaConfig, methods: list[str]) -> None:
        if self.dora and "lora" in methods:
            raise ConfigError("peft.method: 'dora' already is LoRA with a learned magnitude; use one of them")

    def apply(self, model: nn.Module, cfg: DeltaConfig, tokenizer: Any) -> list[str]:
        targets = lora_targets(model, cfg)
        for path in targets:
            set_module(model, path, LoRALinear.wrap(model.get_submodule(path), r=cfg.r, alpha=cfg.alpha,
                                                    dropout=cfg.dropout, rslora=cfg.rslora, dora=self.dora))
        for path in targets:
            layer = model.get_submodule(path)
            for name in ("lora_A", "lora_B"):
                getattr(layer, name).requires_grad_(True)
            if layer.dora:
                layer.lora_magnitude_vector.requires_grad_(True)
        return targets

    def present(self, model: nn.Module) -> bool:
        return any(layer.dora == self.dora for layer in lora_layers(model).values())

    def owns(self, name: str) -> bool:
        return ".lora_" in name

    def mergeable(self, model: nn.Module) -> bool:
        return True

    def merge(self, model: nn.Module) -> None:
        for path, layer in lora_layers(model).items():
            if layer.dora == self.dora:
                set_module(model, path, layer.to_linear())

    def disable(self, model: nn.Module, cfg: DeltaConfig, off: bool) -> None:
        for layer in lora_layers(model).values():
            if layer.dora == self.dora:
                layer.unmerge()
                layer.delta_on = not off

    # ---- PEFT's LoRA format -----------------------------------------------------------------------------------
    def peft_files(self, model: nn.Module, cfg: DeltaConfig, base_model: str | None
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        layers = lora_layers(model)
        first = next(iter(layers.values()))
        config = {"peft_type": "LORA", "task_type": task_type(model), "r": first.r, "lora_alpha": first.alpha,
                  "lora_dropout": cfg.dropout, "use_rslora": first.rslora, "use_dora": first.dora,
                  "target_modules": _target_names(model, list(layers)), "bias": "none",
                  "fan_in_fan_out": _fan_in_fan_out(model), "inference_mode": True, "init_lora_weights": True,
                  "base_model_name_or_path": base_model,
                  "modules_to_save": head_names(model)}
        state: dict[str, torch.Tensor] = {}
        for path, layer in layers.items():
            base = PEFT_PREFIX + hf_path(model, path)
            state[f"{base}.lora_A.weight"] = layer.lora_A.weight
            state[f"{base}.lora_B.weight"] = layer.lora_B.weight
            if layer.dora:
                state[f"{base}.lora_magnitude_vector"] = layer.lora_magnitude_vector
        state.update(head_state(model, PEFT_PREFIX))
        return config, state

    def config_from_peft(self, pc: dict[str, Any], where: str) -> DeltaConfig:
        for key, ok in (("bias", "none"), ("lora_bias", False), ("layer_replication", None)):
            if pc.get(key, ok) not in (ok, None, {}, []):
                raise ModelError(f"{where}: field '{key}' = {pc[key]!r} is not supported (only {ok!r})")
        for key in ("rank_pattern", "alpha_pattern", "exclude_modules", "layers_pattern", "target_parameters",
                    "trainable_token_indices"):
            if pc.get(key):
                raise ModelError(f"{where}: field '{key}' = {pc[key]!r} is not supported; re-save the adapter without it")
        layers = pc.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        targets = pc.get("target_modules")
        if isinstance(targets, str) and not targets:
            targets = None
        return DeltaConfig(method="dora" if pc.get("use_dora") else "lora", target_modules=targets,
                           layers=layers, r=int(pc.get("r", 8)),
                           alpha=float(pc.get("lora_alpha", 8)), dropout=float(pc.get("lora_dropout", 0.0)),
                           rslora=bool(pc.get("use_rslora", False)))

    def load_peft(self, model: nn.Module, state: dict[str, torch.Tensor], d: Path, pc: dict[str, Any]) -> None:
        own = dict(model.named_parameters())
        missing = set(n for n in own if ".lora_" in n)
        head = head_name(model)
        with torch.no_grad():
            for key, value in state.items():
                if not key.startswith(PEFT_PREFIX):
                    raise ModelError(f"'{d}': key '{key}' does not start with '{PEFT_PREFIX}' as PEFT's LoRA keys do")
                hf_key = key[len(PEFT_PREFIX):]
                module, _, pname = hf_key.rpartition(".")
                if pname == "lora_magnitude_vector":
                    module, pname = hf_key, ""
                if head is not None and module.split(".")[0] == head:
                    name = f"{module}.{pname}"
                else:
                    name = lmforge_path(model, module) + (f".{pname}" if pname else "")
                name = name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")
                if name not in own:
                    raise ModelError(f"'{d}': adapter tensor '{key}' has no place in this model (lmforge name '{name}'); "
                                     f"load it onto the model family and size it was trained for")
                copy_checked(own[name], value, key, d)
                missing.discard(name)
        if missing:
            raise ModelError(f"'{d}' lacks adapter weights for {sorted(missing)[:3]}; the adapter is incomplete")


def _target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """PEFT's ``target_modules`` for the LoRA layers at ``paths``: their leaf names when those select exactly
    these layers in the transformers model (``["c_attn"]``), else the full transformers paths (PEFT's list rule
    matches a path equal to an entry), so reloading never adapts a layer that was not trained."""
    hf = sorted(hf_path(model, p) for p in paths)
    leaves = {p.rsplit(".", 1)[-1] for p in hf}
    same_leaf = set()
    for name, module in model.named_modules():
        if name and isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in leaves:
            try:
                same_leaf.add(hf_path(model, name))
            except Exception:  # noqa: BLE001  (a module without a transformers name cannot be selected there)
                continue
    return sorted(leaves) if same_leaf == set(hf) else hf


register(LoRA("lora", dora=False))
register(LoRA("dora", dora=True))
