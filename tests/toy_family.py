"""A model family registered from outside lmforge: ``toy``, llama's architecture with GPT-2's GELU MLP (``c_fc``,
``c_proj``, no biases) in place of SwiGLU, stored as model_type ``toy`` (llama's config.json and names otherwise).

Everything a new decoder family provides, in one file: a config class (a ``DecoderConfig`` with its own
``family``, config.json form and MLP size for the parameter counts), a model class (``DecoderLM`` with its own block), its checkpoint table
(``DecoderCheckpoint``) and the ``Family`` that ties them to what the other layers ask.  Importing it registers it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.core.errors import ModelError
from lmforge.models.decoder import Block, DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.families import Family, register_family
from lmforge.models.flops import DECODER_FLOPS
from lmforge.models.hf import LLAMA_ROWS, DecoderCheckpoint
from lmforge.models.layers import GeluMLP


@dataclass
class ToyConfig(DecoderConfig):
    family: Literal["toy"] = "toy"

    @property
    def mlp_matrices(self) -> int:  # GELU's c_fc and c_proj in place of SwiGLU's three (parameter/FLOP counts)
        return 2

    def to_hf(self) -> dict[str, Any]:
        return {**super().to_hf(), "model_type": "toy", "architectures": ["ToyForCausalLM"]}

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "<dict>") -> "ToyConfig":
        if config.get("model_type") != "toy":
            raise ModelError(f"config.json of '{source}': model_type {config.get('model_type')!r} is not 'toy'")
        llama = DecoderConfig.from_hf({**config, "model_type": "llama"}, source)
        return cls(**{**dataclasses.asdict(llama), "family": "toy"})


class ToyBlock(Block):
    def __init__(self, config: ToyConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.mlp = GeluMLP(config.d_model, config.ffn_dim, bias=False, std=config.initializer_range)


class ToyLM(DecoderLM):
    block_class = ToyBlock


ROWS = [row for row in LLAMA_ROWS if ".mlp." not in row[0]] + [
    (f"blocks.{{i}}.mlp.{p}", f"model.layers.{{i}}.mlp.{p}", False) for p in ("c_fc", "c_proj")]
CHECKPOINT = DecoderCheckpoint("toy", ROWS, base_prefix="model.", config_class=ToyConfig, model_class=ToyLM)

FAMILY = register_family(Family(
    name="toy", model_types={"toy": "Toy"}, kind="decoder", config_class=ToyConfig, model_class=ToyLM,
    config_from_hf=ToyConfig.from_hf, config_to_hf=ToyConfig.to_hf,
    state_dict_to_hf=CHECKPOINT.state_dict_to_hf, state_dict_from_hf=CHECKPOINT.state_dict_from_hf,
    hf_name=CHECKPOINT.hf_name, lmforge_name=CHECKPOINT.lmforge_name, load=CHECKPOINT.load, save=CHECKPOINT.save,
    pretrain_objective="causal_lm",
    finetune={"classification": "head", "text2text": "completion"},
    lora_targets=("q_proj", "v_proj"), adapter_sites=(["o_proj"], ["mlp.c_proj"]),
    prefix_sites=("blocks.{i}.attn.k_proj", "blocks.{i}.attn.v_proj"),
    prefix_shape=lambda c: (c.n_layer, c.kv_heads, c.head_dim),
    classifier="last_token", needs_pad_token=True,
    flops=DECODER_FLOPS,  # a decoder: 6N + attention counts it (its MLP's size is in config.mlp_matrices)
))
