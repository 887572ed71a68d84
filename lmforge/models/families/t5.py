"""The t5 family: T5 v1.0 (``relu``) and v1.1 (``gated-gelu``) encoder-decoders, model_type ``t5``."""

from __future__ import annotations

import functools

from lmforge.models import hf_t5
from lmforge.models.encdec import EncoderDecoderLM
from lmforge.models.families.base import Family, register_family
from lmforge.models.flops import T5_CONVENTION, FlopFormula, meta_params, t5_flops_per_token
from lmforge.models.t5_layers import T5Config

FAMILY = register_family(Family(
    name="t5", model_types={"t5": "T5"}, kind="encoder-decoder",
    config_class=T5Config, model_class=EncoderDecoderLM,
    config_from_hf=hf_t5.config_from_hf, config_to_hf=hf_t5.config_to_hf,
    state_dict_to_hf=hf_t5.state_dict_to_hf, state_dict_from_hf=hf_t5.state_dict_from_hf,
    hf_name=hf_t5.t5_hf_module_name, lmforge_name=functools.partial(hf_t5.t5_hf_module_name, to_hf=False),
    load=hf_t5.load_t5, save=hf_t5.save_t5,
    pretrain_objective="span",
    finetune={"classification": "seq2seq", "text2text": "seq2seq"},
    why_not={
        "token_classification": "token classification needs a bidirectional encoder (bert)",
        "sequence_classifier": "sequence classification with a T5 backbone is not supported: T5 classifies as "
                               "text-to-text (generate the label's text); use task type 'text2text'",
        "classifier_dir": "T5 classification heads are not supported: T5 classifies as text-to-text; use a "
                          "T5ForConditionalGeneration checkpoint with task type 'text2text'",
    },
    lora_targets=("q", "v"),
    adapter_sites=(["self_attn.o", "cross_attn.o"], ["ff.wo"]),
    prefix_sites=("decoder.blocks.{i}.self_attn.k", "decoder.blocks.{i}.self_attn.v"),  # the decoder's self-attention
    prefix_shape=lambda c: (c.decoder_layers, c.num_heads, c.d_kv),
    flops=FlopFormula(meta_params(EncoderDecoderLM), t5_flops_per_token, T5_CONVENTION),
))
