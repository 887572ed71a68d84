"""The gpt2 family: GPT-2 (learned positions, LayerNorm, GELU MLP, fused ``c_attn``), model_type ``gpt2``."""

from __future__ import annotations

from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.families.base import Family, register_family
from lmforge.models.flops import DECODER_FLOPS
from lmforge.models.hf import GPT2

FAMILY = register_family(Family(
    name="gpt2", model_types={"gpt2": "GPT2"}, kind="decoder",
    config_class=DecoderConfig, model_class=DecoderLM,
    config_from_hf=DecoderConfig.from_hf, config_to_hf=DecoderConfig.to_hf,
    state_dict_to_hf=GPT2.state_dict_to_hf, state_dict_from_hf=GPT2.state_dict_from_hf,
    hf_name=GPT2.hf_name, lmforge_name=GPT2.lmforge_name, load=GPT2.load, save=GPT2.save,
    pretrain_objective="causal_lm",
    finetune={"classification": "head", "text2text": "completion"},
    why_not={"token_classification": "token classification needs a bidirectional encoder (bert)"},
    lora_targets=("c_attn",),
    adapter_sites=(["attn.c_proj"], ["mlp.c_proj"]),
    prefix_sites=("blocks.{i}.attn.c_attn", None),
    prefix_shape=lambda c: (c.n_layer, c.kv_heads, c.head_dim),
    classifier="last_token", needs_pad_token=True,
    fan_in_fan_out=True,  # HF's Conv1D layers
    flops=DECODER_FLOPS,
))
