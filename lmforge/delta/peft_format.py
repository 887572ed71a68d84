"""Delta files: Hugging Face PEFT's adapter format for LoRA/DoRA, lmforge's own small format for the rest.

PEFT directory (``PeftModel.from_pretrained(<matching transformers model>, dir)`` gives the same logits)::

    adapter_config.json          peft_type LORA, task_type, r, lora_alpha, lora_dropout, use_rslora, use_dora,
                                 target_modules (leaf names), fan_in_fan_out (true for GPT-2's Conv1D),
                                 modules_to_save (the head, for classifiers)
    adapter_model.safetensors    base_model.model.<transformers path>.lora_A.weight  [r, in]
                                 base_model.model.<transformers path>.lora_B.weight  [out, r]
                                 base_model.model.<transformers path>.lora_magnitude_vector  [out]  (DoRA)
                                 base_model.model.score.weight / classifier.{weight,bias}   (classifiers)

PEFT's A/B are in ``nn.Linear`` layout even for GPT-2's Conv1D, as lmforge's are, so no transposes.

lmforge format (BitFit, trained modules, or LoRA combined with them)::

    delta_config.json            {"format": "lmforge-delta", "method", "peft": <DeltaConfig>, "base_fingerprint",
                                  "family", "id2label"}
    delta.safetensors            every trained tensor by lmforge parameter name (LoRA branches included)

Both carry ``lmforge_delta.json`` / ``delta_config.json`` with the base model's fingerprint (sha256 of its
frozen weights), so loading onto a different base fails by name instead of silently giving garbage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.core.errors import ConfigError, ModelError
from lmforge.core.io import atomic_write_json
from lmforge.delta.apply import apply_delta, lora_layers
from lmforge.delta.config import DeltaConfig
from lmforge.delta.names import hf_path, lmforge_path
from lmforge.delta.prefix import prefix_of
from lmforge.delta.prompt import soft_prompt_of

PEFT_PREFIX = "base_model.model."  # LoRA: PeftModel.base_model is a LoraModel holding the transformers model
PROMPT_PREFIX = "base_model."  # prompt learning: PeftModel.base_model is the transformers model itself
_TASK_TYPES = {"SequenceClassifier": "SEQ_CLS", "TokenClassifier": "TOKEN_CLS", "DecoderLM": "CAUSAL_LM",
               "EncoderDecoderLM": "SEQ_2_SEQ_LM"}


# A classifier's backbone keeps its pretraining heads, which a transformers classifier checkpoint does not hold
# (they are freshly initialised on every load) and which never touch the classifier's output.
_UNUSED_IN_TASK_MODELS = ("backbone.predictions.", "backbone.seq_relationship.", "backbone.lm_head.")


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of the *frozen* parameters (the base a delta was trained on;
    what the delta trains -- BitFit's biases, norms, LoRA/adapter weights -- and the task head, which is always
    saved with the delta, are excluded)."""
    h = hashlib.sha256()
    head = getattr(model, "head_name", None)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad or ".lora_" in name or ".adapter_" in name \
                or {"soft_prompt", "prefix", "ladder"} & set(name.split(".")) or (head and name.startswith(head + ".")):
            continue
        if head and name.startswith(_UNUSED_IN_TASK_MODELS):  # not in a classifier checkpoint: random on load
            continue
        if type(model).__name__ == "TokenClassifier" and name.startswith("backbone.pooler."):
            continue  # BertForTokenClassification has no pooler either
        t = p.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _peft_type(model: nn.Module, methods: list[str]) -> str | None:
    """PEFT's ``peft_type`` when PEFT's format holds the whole delta (LoRA/DoRA alone, or prompt tuning alone, on
    an lmforge model), else None."""
    if type(model).__name__ not in (*_TASK_TYPES, "EncoderLM"):
        return None
    if set(methods) <= {"lora", "dora"}:
        return "LORA"
    if methods == ["prompt"] and type(model).__name__ != "EncoderLM":
        return "PROMPT_TUNING"
    if methods == ["prefix"] and model.config.family in ("gpt2", "llama"):
        # not t5: PEFT cannot give each T5 decoder layer its own prefix (_t5_prefix_rows); not bert: transformers'
        # BERT shifts positions by the prefix length where lmforge keeps them (and its classifiers take no prefix)
        return "PREFIX_TUNING"
    return None


def _head_state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    head = getattr(model, "head_name", None)
    if head is None:  # trained or not, the head is part of what rebuilds the classifier
        return {}
    return {f"{prefix}{head}.{pname}": p for pname, p in getattr(model, head).named_parameters()}


def _peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model).items():
        base = PEFT_PREFIX + hf_path(model, path)
        out[f"{base}.lora_A.weight"] = layer.lora_A.weight
        out[f"{base}.lora_B.weight"] = layer.lora_B.weight
        if layer.dora:
            out[f"{base}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    out.update(_head_state(model, PEFT_PREFIX))
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _prefix_config(model: nn.Module, task_type: str | None) -> dict[str, Any]:
    """PEFT's PREFIX_TUNING config: the table saved folded (``prefix_projection`` false, as PEFT saves it);
    ``num_attention_heads`` / ``token_dim`` are the key/value heads' (PEFT's layout for grouped-query attention)."""
    prefix = prefix_of(model)
    return {"peft_type": "PREFIX_TUNING", "task_type": task_type, "num_virtual_tokens": prefix.n,
            "token_dim": prefix.n_kv_heads * prefix.head_dim, "num_attention_heads": prefix.n_kv_heads,
            "num_layers": prefix.n_layers, "num_transformer_submodules": 1,
            "encoder_hidden_size": model.config.d_model, "prefix_projection": False, "inference_mode": True}


def _prompt_config(model: nn.Module, task_type: str | None) -> dict[str, Any]:
    """PEFT's PROMPT_TUNING config for the model's soft prompt: one transformer submodule (the prompt is the
    encoder's for T5, as PEFT's ``generate`` uses it); the init is recorded as RANDOM, since PEFT would fetch a
    tokenizer for TEXT and the vectors are trained anyway."""
    prompt = soft_prompt_of(model)
    c = model.config
    return {"peft_type": "PROMPT_TUNING", "task_type": task_type, "num_virtual_tokens": prompt.n,
            "token_dim": prompt.weight.shape[1], "num_transformer_submodules": 1,
            "num_attention_heads": getattr(c, "n_head", getattr(c, "num_heads", None)),
            "num_layers": getattr(c, "n_layer", getattr(c, "num_layers", None)),
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
            "inference_mode": True}


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


def save_delta(model: nn.Module, path: str | Path, cfg: DeltaConfig, base_model: str | None = None) -> Path:
    """Write the delta of ``model`` (after :func:`apply_delta` and training) to ``path``: PEFT's format when the
    methods are LoRA/DoRA only, lmforge's otherwise.  Files are written atomically."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    methods = cfg.methods
    family = getattr(getattr(model, "config", None), "family", None)
    meta = {"method": "+".join(methods), "peft": dataclasses.asdict(cfg), "family": family,
            "base_fingerprint": base_fingerprint(model), "base_model": base_model,
            "id2label": {str(k): v for k, v in getattr(model, "id2label", {}).items()} or None,
            "model_class": type(model).__name__,
            "vocab_size": getattr(getattr(model, "config", None), "vocab_size", None)}
    layers = lora_layers(model)
    peft_type = _peft_type(model, methods)
    peft = peft_type is not None
    for stale in (("delta.safetensors", "delta_config.json") if peft else
                  ("adapter_model.safetensors", "adapter_config.json", "lmforge_delta.json")):
        (d / stale).unlink(missing_ok=True)  # a reused directory must not keep the other format's files
    head_names = [model.head_name] if getattr(model, "head_name", None) else None
    if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"):
        task_type = _TASK_TYPES.get(type(model).__name__)
        prompt = peft_type == "PROMPT_TUNING"
        config = {**(_prompt_config if prompt else _prefix_config)(model, task_type),
                  "base_model_name_or_path": base_model, "modules_to_save": head_names}
        table = soft_prompt_of(model).weight if prompt else prefix_of(model).full_table()  # a prefix MLP is folded
        state = {"prompt_embeddings": table, **_head_state(model, PROMPT_PREFIX)}
        _save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in state.items()},
                          d / "adapter_model.safetensors")
        atomic_write_json(d / "adapter_config.json", config)
        atomic_write_json(d / "lmforge_delta.json", {"format": "peft", **meta})
    elif peft:
        task_type = _TASK_TYPES.get(type(model).__name__)
        first = next(iter(layers.values()))
        config = {"peft_type": "LORA", "task_type": task_type, "r": first.r, "lora_alpha": first.alpha,
                  "lora_dropout": cfg.dropout, "use_rslora": first.rslora, "use_dora": first.dora,
                  "target_modules": _target_names(model, list(layers)), "bias": "none",
                  "fan_in_fan_out": family == "gpt2", "inference_mode": True, "init_lora_weights": True,
                  "base_model_name_or_path": base_model,
                  "modules_to_save": head_names}
        _save_safetensors(_peft_state(model), d / "adapter_model.safetensors")
        atomic_write_json(d / "adapter_config.json", config)
        atomic_write_json(d / "lmforge_delta.json", {"format": "peft", **meta})
    else:
        head = getattr(model, "head_name", None)
        state = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()
                 if p.requires_grad or (head and n.startswith(head + "."))}
        _save_safetensors(state, d / "delta.safetensors")
        atomic_write_json(d / "delta_config.json", {"format": "lmforge-delta", **meta})
    return d


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.clone() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def is_delta_dir(path: str | Path) -> bool:
    d = Path(path)
    return (d / "adapter_config.json").is_file() or (d / "delta_config.json").is_file()


def read_delta_meta(path: str | Path) -> dict[str, Any]:
    d = Path(path)
    for name in ("delta_config.json", "lmforge_delta.json"):
        if (d / name).is_file():
            return json.loads((d / name).read_text(encoding="utf-8"))
    return {}


def _config_from_peft(pc: dict[str, Any], where: str) -> DeltaConfig:
    if pc.get("peft_type") == "PROMPT_TUNING":
        n = pc.get("num_virtual_tokens")
        if not isinstance(n, int) or n < 1:
            raise ModelError(f"{where}: num_virtual_tokens={n!r} must be a positive integer")
        return DeltaConfig(method="prompt", num_virtual_tokens=n, prompt_init="random")
    if pc.get("peft_type") == "PREFIX_TUNING":
        n = pc.get("num_virtual_tokens")
        if not isinstance(n, int) or n < 1:
            raise ModelError(f"{where}: num_virtual_tokens={n!r} must be a positive integer")
        return DeltaConfig(method="prefix", num_virtual_tokens=n, prompt_init="random")
    if pc.get("peft_type") != "LORA":
        raise ModelError(f"{where}: peft_type {pc.get('peft_type')!r} is not supported (supported: LORA, with "
                         f"use_dora for DoRA; PROMPT_TUNING; PREFIX_TUNING)")
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


def load_delta(model: nn.Module, path: str | Path, check_base: bool = True) -> DeltaConfig:
    """Apply the delta stored in ``path`` (PEFT's LoRA/DoRA format, from lmforge or PEFT, or lmforge's own) to
    ``model`` in place; returns its config.  A base whose fingerprint differs from the one recorded fails."""
    d = Path(path)
    meta = read_delta_meta(d)
    peft_file = d / "adapter_config.json"
    if (d / "delta_config.json").is_file():
        cfg = _coerce_delta_config(meta.get("peft", {}), str(d / "delta_config.json"))
        # the saved tensors overwrite any start: no text (tokenizer) or activation init on reload
        apply_delta(model, dataclasses.replace(cfg, prompt_init="random"))
        _check_base(model, meta, d, check_base)
        state = load_file(str(d / "delta.safetensors"))
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
    pc = json.loads(peft_file.read_text(encoding="utf-8"))
    cfg = _config_from_peft(pc, str(peft_file))
    if meta.get("peft"):
        cfg.train_head = bool(meta["peft"].get("train_head", True))
    apply_delta(model, cfg)
    _check_base(model, meta, d, check_base)
    state = load_file(str(d / "adapter_model.safetensors"))
    if cfg.methods in (["prompt"], ["prefix"]):
        _load_prompt_state(model, state, d, pc)
        return cfg
    own = dict(model.named_parameters())
    missing = set(n for n in own if ".lora_" in n)
    head = getattr(model, "head_name", None)
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
            _copy_checked(own[name], value, key, d)
            missing.discard(name)
    if missing:
        raise ModelError(f"'{d}' lacks adapter weights for {sorted(missing)[:3]}; the adapter is incomplete")
    return cfg


def _load_prompt_state(model: nn.Module, state: dict[str, torch.Tensor], d: Path, pc: dict[str, Any]) -> None:
    """PEFT's prompt/prefix tuning tensors and the head (``base_model.<head>.*``).  Prompt tuning:
    ``prompt_embeddings [k * n, d]`` (k transformer submodules: T5 adapters from PEFT default to 2, encoder rows
    first; lmforge prompts the encoder, as PEFT's ``generate`` does).  Prefix tuning: ``prompt_embeddings [n,
    L * 2 * kv_dim]``, the folded table."""
    table = state.get("prompt_embeddings")
    if table is None:
        raise ModelError(f"'{d}/adapter_model.safetensors' has no 'prompt_embeddings'; the adapter is incomplete")
    prefix = prefix_of(model)
    if prefix is not None:
        want = (prefix.n, prefix.n_layers * 2 * prefix.n_kv_heads * prefix.head_dim)
        theirs = (pc.get("num_layers"), pc.get("num_attention_heads"), pc.get("token_dim"))
        ours = (prefix.n_layers, prefix.n_kv_heads, prefix.n_kv_heads * prefix.head_dim)
        if theirs != ours or tuple(table.shape) != want:
            raise ModelError(f"'{d}': a prefix for (layers, kv heads, token_dim) = {theirs}, shape {tuple(table.shape)}; "
                             f"this model needs {ours}, shape {want}; load it onto the model it was trained for")
        if model.config.family == "t5" and pc.get("num_transformer_submodules", 2) == 2:
            table = _t5_prefix_rows(table, prefix.n_layers)
        target, rows = prefix.table, want[0]
    else:
        target = soft_prompt_of(model).weight
        rows, dim = target.shape
        if table.ndim != 2 or table.shape[1] != dim or table.shape[0] % rows:
            raise ModelError(f"'{d}': prompt_embeddings has shape {tuple(table.shape)}; this model needs "
                             f"[{rows}·k, {dim}] (token_dim {dim}); load it onto the model it was trained for")
    head = getattr(model, "head_name", None)
    own = dict(model.named_parameters())
    with torch.no_grad():
        target.copy_(table[:rows])
        for key, value in state.items():
            if key == "prompt_embeddings":
                continue
            name = key[len(PROMPT_PREFIX):] if key.startswith(PROMPT_PREFIX) else key
            if head is None or not name.startswith(head + ".") or name not in own:
                raise ModelError(f"'{d}': tensor '{key}' has no place in this model; load it onto the model type it "
                                 f"was trained for")
            _copy_checked(own[name], value, key, d)


def _copy_checked(param: torch.Tensor, value: torch.Tensor, key: str, d: Path) -> None:
    if param.shape != value.shape:
        raise ModelError(f"'{d}': '{key}' has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
    param.copy_(value)


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
