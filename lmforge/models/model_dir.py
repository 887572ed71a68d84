"""Model directories, whatever the family: reading and writing the files of a Hugging Face checkpoint.

A model directory holds ``config.json``, ``model.safetensors`` (or sharded safetensors, or ``pytorch_model.bin``),
``generation_config.json`` where the family has one, and the tokenizer's files.  The converters -- decoders in
:mod:`lmforge.models.hf`, BERT in :mod:`lmforge.models.hf_bert`, T5 in :mod:`lmforge.models.hf_t5`, classifiers
in :mod:`lmforge.models.hf_task` -- map names and configs and call the helpers here for the files, so the layout,
the atomic write and the tokenizer checks live in one place.  ``load_model`` / ``save_model``, which pick the
converter, are :mod:`lmforge.models.io`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from lmforge.core.errors import ModelError
from lmforge.core.io import atomic_dir, atomic_write_json, writing
from lmforge.core.io import read_json as io_read_json
from lmforge.core.outputs import MARKER, make_marker, publish_dir, read_marker
from lmforge.core.tokenizer import Tokenizer

M = TypeVar("M", bound=torch.nn.Module)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The lmforge model inside torch.compile / DDP wrappers."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and not hasattr(model, "config"):
            model = getattr(model, attr)
    return model


def unwrap_as(model: torch.nn.Module, cls: type[M], who: str) -> M:
    """The ``cls`` inside torch.compile / DDP wrappers (peeled until one is found: a compiled module forwards
    ``config`` to the model it wraps); anything else is an error naming ``who`` (the saver)."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and not isinstance(model, cls):
            model = getattr(model, attr)
    if not isinstance(model, cls):
        raise ModelError(f"{who} expects a{'n' if cls.__name__[0] in 'AEIOU' else ''} {cls.__name__}, "
                         f"got {type(model).__name__}")
    return model


def read_json(path: Path) -> Any:
    return io_read_json(path, ModelError, "re-save the model directory")


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def require_model_dir(d: Path) -> dict[str, Any]:
    """``config.json`` of model dir ``d``; a path without one is one line saying what it is instead."""
    if not (d / "config.json").is_file():
        why = ": the path does not exist" if not d.exists() else (": it is a file" if d.is_file() else " in it")
        raise ModelError(f"'{d}' is not a model directory: no config.json{why} (pass a directory written by lmforge "
                         f"or a Hugging Face checkpoint)")
    config = read_json(d / "config.json")
    if not isinstance(config, dict):  # every loader reads keys from it
        raise ModelError(f"'{d / 'config.json'}' holds a JSON {type(config).__name__}, not an object of config "
                         f"fields; restore the file or re-save the model directory")
    return config


def read_weights(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model dir ``d``, with the checkpoint's own (HF) names: ``model.safetensors``, sharded
    safetensors (``model.safetensors.index.json``) or ``pytorch_model.bin`` (read with ``weights_only``)."""
    def load_bin(p: Path) -> dict[str, torch.Tensor]:
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # pickles with code in them, corrupt files
            raise ModelError(f"cannot read '{p}' as a weights-only PyTorch checkpoint: {e}") from None

    def load_st(p: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(p))
        except Exception as e:
            raise ModelError(f"cannot read '{p}' as safetensors: {e}") from None

    for single, index, loader in (("model.safetensors", "model.safetensors.index.json", load_st),
                                  ("pytorch_model.bin", "pytorch_model.bin.index.json", load_bin)):
        if (d / single).is_file():
            return loader(d / single)
        if (d / index).is_file():
            weight_map = read_json(d / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelError(f"'{d / index}' has no 'weight_map' mapping")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (d / shard).is_file():
                    raise ModelError(f"'{d / index}' lists shard '{shard}', which is missing from '{d}'")
                state.update(loader(d / shard))
            return state
    raise ModelError(f"'{d}' has a config.json but no weights (expected model.safetensors, "
                     f"model.safetensors.index.json or pytorch_model.bin)")


def model_marker(d: Path) -> dict[str, Any] | None:
    """The ``lmforge.json`` of a model dir lmforge wrote (None for other dirs, e.g. transformers' own)."""
    marker = read_marker(d)
    return marker if marker is not None and marker.get("kind") == "model" else None


def record_train_window(d: str | Path, window: int) -> None:
    """Add ``train_window`` (the tokens per input the model was trained on) to the marker of the model dir lmforge
    just wrote at ``d``, so evaluation can default to the window behind the run's own numbers.  A family that saves
    without :func:`write_model_dir` (no marker) records nothing: its evaluation keeps the model's context."""
    d = Path(d)
    marker = model_marker(d)
    if marker is not None:
        atomic_write_json(d / MARKER, {**marker, "train_window": int(window)})


def train_window(d: str | Path) -> int | None:
    """The window recorded by :func:`record_train_window`; None for a dir without one (transformers' own,
    or one saved by a fine-tuning run or an older lmforge)."""
    window = (model_marker(Path(d)) or {}).get("train_window")
    return window if isinstance(window, int) and not isinstance(window, bool) and window >= 2 else None


def load_tokenizer_for(d: Path, vocab_size: int) -> Any:
    """The tokenizer saved in model dir ``d`` (None without tokenizer.json), checked against the model: in a dir
    lmforge wrote, it must be the very tokenizer the marker records (fingerprint and size: a swapped tokenizer of
    the same size maps ids to other text); in any other dir it must not have more ids than the model has embedding
    rows (fewer is fine: transformers pads embeddings).  Shared by every family's loader."""
    if not (d / "tokenizer.json").is_file():
        return None
    tokenizer = Tokenizer.load(d)
    if tokenizer.vocab_size > vocab_size:
        raise ModelError(f"tokenizer of '{d}' has {tokenizer.vocab_size} tokens but the model has only "
                         f"{vocab_size} embedding rows (vocab_size); use the tokenizer the model was trained with")
    recorded = (model_marker(d) or {}).get("tokenizer")
    if isinstance(recorded, dict) and recorded.get("fingerprint") != tokenizer.fingerprint:
        raise ModelError(f"'{d / 'tokenizer.json'}' is not the tokenizer this model was saved with: "
                         f"'{d / MARKER}' records fingerprint {str(recorded.get('fingerprint'))[:12]} "
                         f"({recorded.get('vocab_size')} tokens), the file has {tokenizer.fingerprint[:12]} "
                         f"({tokenizer.vocab_size} tokens); put the model's own tokenizer back (e.g. from its "
                         f"run dir's tokenizer/) or re-export the model with the tokenizer it was trained with")
    return tokenizer


def cast_state(state: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype | None
               ) -> dict[str, torch.Tensor]:
    """Move a state dict to ``device``; floating tensors to ``dtype`` unless it is None (keep stored dtype)."""
    return {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
            for k, v in state.items()}


def write_model_dir(path: str | Path, state: dict[str, torch.Tensor], hf_config: dict[str, Any], dtype: torch.dtype,
                    tokenizer: Any = None, vocab_size: int | None = None, model_max_length: int | None = None,
                    generation_config: dict[str, Any] | None = None) -> Path:
    """Write a HF checkpoint dir atomically (tmp dir, then rename): ``config.json`` (+ ``dtype``),
    ``model.safetensors`` (CPU, contiguous), ``generation_config.json`` when given and the tokenizer's files.
    Every family's saver ends here, so the layout and the tokenizer check live in one place.  The dir's
    ``lmforge.json`` marker records what wrote it and the tokenizer's fingerprint (checked on load); an existing
    ``path`` holding files lmforge did not write keeps them (only namesakes are replaced)."""
    if tokenizer is not None and vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ModelError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size} "
                         f"embedding rows; build the model with vocab_size >= the tokenizer's")
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    name = str(dtype).removeprefix("torch.")
    hf_config = {**hf_config, "dtype": name, "torch_dtype": name}
    path = Path(path)
    with atomic_dir(path, publish=publish_dir) as tmp:  # a full disk at any file: named, the old dir kept
        with writing(path / "config.json"):
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        if generation_config is not None:
            with writing(path / "generation_config.json"):
                (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n",
                                                            encoding="utf-8")
        with writing(path / "model.safetensors"):
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            with writing(path):  # several files: an error without a file name names the model dir
                tokenizer.save(tmp, model_max_length=model_max_length)
        recorded = None if tokenizer is None else {"fingerprint": tokenizer.fingerprint,
                                                    "vocab_size": tokenizer.vocab_size}
        marker = make_marker("model", [p.name for p in tmp.iterdir()], tokenizer=recorded)
        with writing(path / MARKER):
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return path
