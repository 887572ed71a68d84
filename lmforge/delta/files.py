"""Delta files: Hugging Face PEFT's adapter format when PEFT has the method, lmforge's own small format otherwise.

PEFT's format (:mod:`lmforge.delta.peft_format`) is written when the delta is one registered method whose
``peft_supported(model)`` holds (LoRA/DoRA; prompt tuning; decoders' prefix tuning); the method gives the config
and the tensors::

    adapter_config.json          peft_type, task_type, the method's settings, modules_to_save (the head)
    adapter_model.safetensors    the method's tensors by transformers path, the head's
    lmforge_delta.json           {"format": "peft", <meta>}

lmforge's format (every other method or combination) needs nothing from the method::

    delta_config.json            {"format": "lmforge-delta", "method", "peft": <DeltaConfig>, "base_fingerprint",
                                  "family", "id2label", ...}
    delta.safetensors            every trained tensor by lmforge parameter name, and the head's

and loads by applying the methods again (random start) and copying the tensors in.  Both record the base model's
fingerprint (sha256 of its frozen weights), so loading onto a different base fails by name instead of silently
giving garbage.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.core.io import atomic_write_json, read_json
from lmforge.delta.apply import apply_delta
from lmforge.delta.config import DeltaConfig
from lmforge.delta.peft_format import _config_from_peft, cpu_state, peft_holds
from lmforge.delta.registry import DeltaMethod, get_method, in_order, registered
from lmforge.models.families import family_of

# A classifier's backbone keeps its pretraining heads, which a transformers classifier checkpoint does not hold
# (they are freshly initialised on every load) and which never touch the classifier's output.
_UNUSED_IN_TASK_MODELS = ("backbone.predictions.", "backbone.seq_relationship.", "backbone.lm_head.")


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of the *frozen* parameters (the base a delta was trained on;
    what the delta trains -- BitFit's biases, norms, LoRA/adapter weights -- every method's own parameters and
    the task head, which is always saved with the delta, are excluded)."""
    h = hashlib.sha256()
    head = getattr(model, "head_name", None)
    methods = registered()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad or any(m.owns(name) for m in methods) or (head and name.startswith(head + ".")):
            continue
        if head and name.startswith(_UNUSED_IN_TASK_MODELS):  # not in a classifier checkpoint: random on load
            continue
        if type(model).__name__ == "TokenClassifier" and name.startswith("backbone.pooler."):
            continue  # BertForTokenClassification has no pooler either
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _peft_writer(model: nn.Module, methods: list[str]) -> DeltaMethod | None:
    """The method that writes PEFT's format, when PEFT's format holds the whole delta (one method), else None."""
    chosen = in_order(methods)
    if len(chosen) == 1 and peft_holds(model) and chosen[0].peft_supported(model):
        return chosen[0]
    return None


def save_delta(model: nn.Module, path: str | Path, cfg: DeltaConfig, base_model: str | None = None) -> Path:
    """Write the delta of ``model`` (after :func:`apply_delta` and training) to ``path``: PEFT's format when PEFT
    has the method, lmforge's otherwise.  Files are written atomically."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    methods = cfg.methods
    family = getattr(getattr(model, "config", None), "family", None)
    meta = {"method": "+".join(methods), "peft": dataclasses.asdict(cfg), "family": family,
            "base_fingerprint": base_fingerprint(model), "base_model": base_model,
            "id2label": {str(k): v for k, v in getattr(model, "id2label", {}).items()} or None,
            "model_class": type(model).__name__,
            "vocab_size": getattr(getattr(model, "config", None), "vocab_size", None)}
    writer = _peft_writer(model, methods)
    for stale in (("delta.safetensors", "delta_config.json") if writer else
                  ("adapter_model.safetensors", "adapter_config.json", "lmforge_delta.json")):
        (d / stale).unlink(missing_ok=True)  # a reused directory must not keep the other format's files
    if writer is not None:
        config, state = writer.peft_files(model, cfg, base_model)
        _save_safetensors(cpu_state(state), d / "adapter_model.safetensors")
        atomic_write_json(d / "adapter_config.json", config)
        atomic_write_json(d / "lmforge_delta.json", {"format": "peft", **meta})
    else:
        head = getattr(model, "head_name", None)
        state = {n: p for n, p in model.named_parameters() if p.requires_grad or (head and n.startswith(head + "."))}
        _save_safetensors(cpu_state(state), d / "delta.safetensors")
        atomic_write_json(d / "delta_config.json", {"format": "lmforge-delta", **meta})
    return d


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.clone() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def is_delta_dir(path: str | Path) -> bool:
    d = Path(path)
    return (d / "adapter_config.json").is_file() or (d / "delta_config.json").is_file()


_FIX = "restore the adapter dir (or fine-tune again: RUN_DIR/adapter)"


def read_delta_meta(path: str | Path) -> dict[str, Any]:
    d = Path(path)
    for name in ("delta_config.json", "lmforge_delta.json"):
        if (d / name).is_file():
            meta = read_json(d / name, ModelError, _FIX)
            if not isinstance(meta, dict):
                raise ModelError(f"'{d / name}' holds a JSON {type(meta).__name__}, not an object; {_FIX}")
            return meta
    return {}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A delta's safetensors file; a missing, truncated or foreign file is one line naming it."""
    if not path.is_file():
        raise ModelError(f"'{path}' is missing: the adapter dir is incomplete; {_FIX}")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a torn or foreign file
        raise ModelError(f"cannot read '{path}' as safetensors ({e}); {_FIX}") from None


def _check_family(model: nn.Module, meta: dict[str, Any], d: Path) -> None:
    """A delta trained on one family cannot fit another (its layer names and shapes are the family's): say that,
    before target modules that match nothing or shapes that differ would say something less to the point."""
    trained_on, family = meta.get("family"), family_of(model)
    if trained_on and family is not None and trained_on != family.name:
        raise ModelError(f"'{d}' was trained on a {trained_on} base ({meta.get('base_model') or 'base unknown'}) "
                         f"but the base given is a {family.name} model; pass the {trained_on} base it was trained on")


def load_delta(model: nn.Module, path: str | Path, check_base: bool = True) -> DeltaConfig:
    """Apply the delta stored in ``path`` (PEFT's format, from lmforge or PEFT, or lmforge's own) to ``model`` in
    place; returns its config.  A base whose fingerprint differs from the one recorded fails."""
    d = Path(path)
    meta = read_delta_meta(d)
    _check_family(model, meta, d)
    peft_file = d / "adapter_config.json"
    if (d / "delta_config.json").is_file():
        cfg = _coerce_delta_config(meta.get("peft", {}), str(d / "delta_config.json"))
        # the saved tensors overwrite any start: no text (tokenizer) or activation init on reload
        apply_delta(model, dataclasses.replace(cfg, prompt_init="random"))
        _check_base(model, meta, d, check_base)
        state = _read_tensors(d / "delta.safetensors")
        own = dict(model.named_parameters())
        unknown = [k for k in state if k not in own]
        if unknown:
            raise ModelError(f"'{d}/delta.safetensors' has tensors {unknown[:3]} this model does not have; "
                             f"load it onto the base it was trained from")
        missing = [n for n, p in own.items() if p.requires_grad and n not in state]
        if missing:
            raise ModelError(f"'{d}/delta.safetensors' lacks {missing[:3]}; the delta is incomplete")
        bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
        if bad:
            raise ModelError(f"'{d}/delta.safetensors': shapes differ from the model's: {bad[:2]}; load it onto the "
                             f"model (and label count) it was trained with")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
        return cfg
    if not peft_file.is_file():
        raise ModelError(f"'{d}' holds no delta (adapter_config.json or delta_config.json); pass the adapter dir "
                         f"a fine-tuning run wrote (RUN_DIR/adapter)")
    pc = read_json(peft_file, ModelError, _FIX)
    if not isinstance(pc, dict):
        raise ModelError(f"'{peft_file}' holds a JSON {type(pc).__name__}, not PEFT's config object; {_FIX}")
    cfg = _config_from_peft(pc, str(peft_file))
    if meta.get("peft"):
        cfg.train_head = bool(meta["peft"].get("train_head", True))
    apply_delta(model, cfg)
    _check_base(model, meta, d, check_base)
    get_method(cfg.methods[0]).load_peft(model, _read_tensors(d / "adapter_model.safetensors"), d, pc)
    return cfg


def _check_base(model: nn.Module, meta: dict[str, Any], d: Path, check: bool) -> None:
    want = meta.get("base_fingerprint")
    if check and want and base_fingerprint(model) != want:
        raise ModelError(f"'{d}' was trained on a different base model (fingerprint {want[:12]}… recorded, "
                         f"{base_fingerprint(model)[:12]}… given); load it onto the base named in its "
                         f"config ({meta.get('base_model')})")


def _coerce_delta_config(raw: dict[str, Any], where: str) -> DeltaConfig:
    names = {f.name for f in dataclasses.fields(DeltaConfig)}
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown peft keys {unknown}")
    return DeltaConfig(**raw)
