"""Hugging Face checkpoints of decoder LMs: the one name/layout map per family, state dicts under HF names, and
loading/saving decoder model directories (the files themselves are :mod:`lmforge.models.model_dir`'s, the
config.json mapping :mod:`lmforge.models.decoder_config`'s; ``load_model`` / ``save_model`` for every family are
:mod:`lmforge.models.io`'s).

A model directory is a Hugging Face checkpoint (``config.json``, ``model.safetensors``, tokenizer files,
``generation_config.json``).  lmforge's module paths are its own and uniform across families
(``blocks.3.attn.q_proj``); the Linear leaf names are Hugging Face's.  A :class:`DecoderCheckpoint` holds one
family's table, the only place where lmforge paths meet HF paths, including GPT-2's ``Conv1D`` layers, whose
weights HF stores transposed (``[in, out]``) — lmforge uses ``nn.Linear`` (``[out, in]``) throughout.
:data:`GPT2` and :data:`LLAMA` are the built-in ones (llama's also reads mistral and qwen2 checkpoints); a
variant decoder family builds its own with its rows, config class and model class.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lmforge.core.errors import ModelError
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.model_dir import (cast_state, load_tokenizer_for, read_weights, require_model_dir, unwrap_as,
                                      write_model_dir)

# Buffers some HF checkpoints carry that hold no weights (old GPT-2 causal-mask buffers, old RoPE caches).
_IGNORED_HF_KEYS = re.compile(r"(\.attn\.(bias|masked_bias)|\.rotary_emb\.inv_freq)$")


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


class DecoderCheckpoint:
    """One decoder family as a HF checkpoint.

    ``rows``: (lmforge module path, HF module path in the ``*ForCausalLM`` model, HF stores the weight
    transposed), ``{i}`` = block index; ``base_prefix``: HF's base-model attribute (``transformer.``), which
    base-model checkpoints (``GPT2Model``) leave out.  ``config_class`` / ``model_class`` build the model."""

    def __init__(self, family: str, rows: list[tuple[str, str, bool]], base_prefix: str,
                 config_class: type[DecoderConfig] = DecoderConfig, model_class: type[DecoderLM] = DecoderLM) -> None:
        self.family, self.base_prefix = family, base_prefix
        self.config_class, self.model_class = config_class, model_class
        self._rows = [(_compile(a), a, _compile(b), b, t) for a, b, t in rows]

    # ---- names ---------------------------------------------------------------------------------
    def _map_module(self, name: str, to_hf: bool) -> tuple[str, bool] | None:
        """Exact module-path mapping; returns (mapped path, transposed) or None."""
        for pat_lm, tpl_lm, pat_hf, tpl_hf, transposed in self._rows:
            m = (pat_lm if to_hf else pat_hf).match(name)
            if m:
                tpl = tpl_hf if to_hf else tpl_lm
                return (tpl.replace("{i}", m.group("i")) if "{i}" in tpl else tpl), transposed
        return None

    def _map_path(self, name: str, to_hf: bool) -> str:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # longest mapped prefix, rest kept (e.g. '.lora_A')
            hit = self._map_module(".".join(parts[:cut]), to_hf)
            if hit is not None:
                return ".".join([hit[0], *parts[cut:]])
        side = "lmforge" if to_hf else "Hugging Face"
        raise ModelError(f"'{name}' is not a {side} module path of a {self.family} model")

    def hf_name(self, name: str) -> str:
        """lmforge module path -> HF module path in the ``*ForCausalLM`` model
        (``blocks.0.attn.q_proj`` -> ``model.layers.0.self_attn.q_proj``); a suffix below a mapped module is
        kept (``blocks.0.attn.c_attn.lora_A`` -> ``transformer.h.0.attn.c_attn.lora_A``)."""
        return self._map_path(name, to_hf=True)

    def lmforge_name(self, hf_name: str) -> str:
        """HF module path -> lmforge module path (inverse of :meth:`hf_name`)."""
        return self._map_path(hf_name, to_hf=False)

    def transposed(self, name: str) -> bool:
        """True if HF stores this lmforge module's weight transposed (GPT-2's Conv1D layers)."""
        hit = self._map_module(name, to_hf=True)
        return bool(hit and hit[1])

    # ---- state dicts ---------------------------------------------------------------------------
    def state_dict_to_hf(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's weights under HF key names and layouts (tied head left out, as HF saves it)."""
        model = unwrap_as(model, self.model_class, "save_decoder")
        config = model.config
        out: dict[str, torch.Tensor] = {}
        for key, value in model.state_dict().items():
            if key == "lm_head.weight" and config.tie_embeddings:
                continue
            module, _, param = key.rpartition(".")
            hit = self._map_module(module, to_hf=True)
            if hit is None:
                raise ModelError(f"parameter '{key}' has no Hugging Face equivalent (merge or remove delta "
                                 f"modules before saving a full model)")
            hf_module, transposed = hit
            out[f"{hf_module}.{param}"] = value.t() if transposed and param == "weight" else value
        return out

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], config: DecoderConfig,
                           source: str = "<state dict>") -> dict[str, torch.Tensor]:
        """HF keys/layouts -> lmforge keys/layouts; missing or unexpected keys raise ``ModelError``."""
        prefix = self.base_prefix
        keys = [k for k in hf_state if not _IGNORED_HF_KEYS.search(k)]
        if not any(k.startswith(prefix) for k in keys):  # a base-model checkpoint (GPT2Model, LlamaModel)
            hf_state = {(k if k.startswith("lm_head.") else prefix + k): v for k, v in hf_state.items()}
            keys = [k if k.startswith("lm_head.") else prefix + k for k in keys]
        out: dict[str, torch.Tensor] = {}
        unexpected = []
        for key in keys:
            module, _, param = key.rpartition(".")
            hit = self._map_module(module, to_hf=False)
            if hit is None:
                unexpected.append(key)
                continue
            lm_module, transposed = hit
            if lm_module == "lm_head" and config.tie_embeddings:
                continue  # tied: the head is the embedding
            value = hf_state[key]
            # Contiguous: loaded with assign=True, a transposed view would become a strided Parameter (slower
            # matmuls, and FSDP cannot shard it).
            out[f"{lm_module}.{param}"] = value.t().contiguous() if transposed and param == "weight" else value
        with torch.device("meta"):
            expected = self.model_class(config).state_dict()
        if config.tie_embeddings:
            expected.pop("lm_head.weight", None)
        missing = [k for k in expected if k not in out]
        unexpected += [k for k in out if k not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} weight(s), e.g. " +
                             ", ".join(self.hf_name(k.rpartition('.')[0]) + '.' + k.rpartition('.')[2]
                                       for k in missing[:4]))
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected weight(s), e.g. {', '.join(unexpected[:4])}")
            raise ModelError(f"weights of '{source}' do not match its config.json ({config.family}): "
                             f"{'; '.join(parts)}")
        bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in out.items()
               if tuple(v.shape) != tuple(expected[k].shape)]
        if bad:
            k, got, want = bad[0]
            raise ModelError(f"weights of '{source}': '{k}' has shape {list(got)} but config.json implies "
                             f"{list(want)} ({len(bad)} mismatched tensor(s))")
        return out

    # ---- model directories ---------------------------------------------------------------------
    def load(self, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float32
             ) -> tuple[DecoderLM, Any]:
        """Load a HF/lmforge decoder directory -> ``(model in eval mode, Tokenizer or None)``.

        Reads ``model.safetensors`` (or sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``
        with ``weights_only=True``).  ``dtype=None`` keeps the stored dtype.  The tokenizer is loaded when
        ``tokenizer.json`` exists; one with more ids than the model has embedding rows is refused.
        """
        d = Path(path)
        config = self.config_class.from_hf(require_model_dir(d), source=str(d))
        tokenizer = load_tokenizer_for(d, config.vocab_size)
        state = self.state_dict_from_hf(read_weights(d), config, source=str(d))
        state = cast_state(state, device, dtype)
        with torch.device("meta"):
            model = self.model_class(config)
        model.load_state_dict(state, strict=not config.tie_embeddings, assign=True)
        model.tie_weights()
        return model.eval(), tokenizer

    def save(self, model: torch.nn.Module, path: str | Path, tokenizer: Any = None,
             generation_config: dict[str, Any] | None = None) -> Path:
        """Write a decoder as a HF checkpoint directory (atomically: tmp dir, then rename).

        Files: ``config.json`` (incl. ``architectures``, ``model_type``, ``dtype``), ``model.safetensors``
        (HF key names/layouts, tied head stored once as HF does), ``generation_config.json`` (token ids plus
        ``generation_config``), and the tokenizer's files when ``tokenizer`` is given.
        """
        model = unwrap_as(model, self.model_class, "save_decoder")
        config = model.config
        gen = {k: v for k, v in dict(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                     pad_token_id=config.pad_token_id).items() if v is not None}
        gen.update(generation_config or {})
        return write_model_dir(path, self.state_dict_to_hf(model), config.to_hf(), model.dtype, tokenizer=tokenizer,
                               vocab_size=config.vocab_size, generation_config=gen)


GPT2 = DecoderCheckpoint("gpt2", [
    ("embed_tokens", "transformer.wte", False),
    ("embed_positions", "transformer.wpe", False),
    ("blocks", "transformer.h", False),
    ("blocks.{i}", "transformer.h.{i}", False),
    ("blocks.{i}.attn_norm", "transformer.h.{i}.ln_1", False),
    ("blocks.{i}.attn", "transformer.h.{i}.attn", False),
    ("blocks.{i}.attn.c_attn", "transformer.h.{i}.attn.c_attn", True),
    ("blocks.{i}.attn.c_proj", "transformer.h.{i}.attn.c_proj", True),
    ("blocks.{i}.mlp_norm", "transformer.h.{i}.ln_2", False),
    ("blocks.{i}.mlp", "transformer.h.{i}.mlp", False),
    ("blocks.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_fc", True),
    ("blocks.{i}.mlp.c_proj", "transformer.h.{i}.mlp.c_proj", True),
    ("norm", "transformer.ln_f", False),
    ("lm_head", "lm_head", False),
], base_prefix="transformer.")

LLAMA_ROWS = [
    ("embed_tokens", "model.embed_tokens", False),
    ("blocks", "model.layers", False),
    ("blocks.{i}", "model.layers.{i}", False),
    ("blocks.{i}.attn_norm", "model.layers.{i}.input_layernorm", False),
    ("blocks.{i}.attn", "model.layers.{i}.self_attn", False),
    *[(f"blocks.{{i}}.attn.{p}", f"model.layers.{{i}}.self_attn.{p}", False)
      for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
    ("blocks.{i}.mlp_norm", "model.layers.{i}.post_attention_layernorm", False),
    ("blocks.{i}.mlp", "model.layers.{i}.mlp", False),
    *[(f"blocks.{{i}}.mlp.{p}", f"model.layers.{{i}}.mlp.{p}", False)
      for p in ("gate_proj", "up_proj", "down_proj")],
    ("norm", "model.norm", False),
    ("lm_head", "lm_head", False),
]
"""Llama's table, which a variant of the llama architecture starts from (replacing the MLP rows, say)."""
LLAMA = DecoderCheckpoint("llama", LLAMA_ROWS, base_prefix="model.")

# The two flavours DecoderConfig itself builds, for the helpers below that take a config.
_BY_FAMILY = {GPT2.family: GPT2, LLAMA.family: LLAMA}


def hf_module_name(config: DecoderConfig, name: str) -> str:
    """lmforge module path -> HF module path (see :meth:`DecoderCheckpoint.hf_name`) of a gpt2/llama model."""
    return _BY_FAMILY[config.family].hf_name(name)


def lmforge_module_name(config: DecoderConfig, hf_name: str) -> str:
    """HF module path -> lmforge module path (inverse of :func:`hf_module_name`)."""
    return _BY_FAMILY[config.family].lmforge_name(hf_name)


def hf_weight_is_transposed(config: DecoderConfig, name: str) -> bool:
    """True if HF stores this lmforge module's weight transposed (GPT-2's Conv1D layers)."""
    return _BY_FAMILY[config.family].transposed(name)


def load_config(path: str | Path) -> DecoderConfig:
    """The DecoderConfig of a model directory (reads config.json only)."""
    d = Path(path)
    return DecoderConfig.from_hf(require_model_dir(d), source=str(d))
