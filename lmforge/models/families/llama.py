"""The llama family: Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention) and its same-math kin, model_types
``llama``, ``qwen2`` (biases on q, k, v: ``DecoderConfig.qkv_bias``) and ``mistral`` (without sliding window)."""

from __future__ import annotations

from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.families.base import Family, register_family
from lmforge.models.flops import DECODER_FLOPS
from lmforge.models.hf import LLAMA

FAMILY = register_family(Family(
    name="llama", model_types={"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}, kind="decoder",
    config_class=DecoderConfig, model_class=DecoderLM,
    config_from_hf=DecoderConfig.from_hf, config_to_hf=DecoderConfig.to_hf,
    state_dict_to_hf=LLAMA.state_dict_to_hf, state_dict_from_hf=LLAMA.state_dict_from_hf,
    hf_name=LLAMA.hf_name, lmforge_name=LLAMA.lmforge_name, load=LLAMA.load, save=LLAMA.save,
    pretrain_objective="causal_lm",
    finetune={"classification": "head", "text2text": "completion"},
    why_not={"token_classification": "token classification needs a bidirectional encoder (bert)"},
    lora_targets=("q_proj", "v_proj"),
    adapter_sites=(["o_proj"], ["down_proj"]),
    prefix_sites=("blocks.{i}.attn.k_proj", "blocks.{i}.attn.v_proj"),
    prefix_shape=lambda c: (c.n_layer, c.kv_heads, c.head_dim),
    classifier="last_token", needs_pad_token=True,
    flops=DECODER_FLOPS,
))
