"""The bert family: BERT (post-LN encoder, pooler, MLM and NSP heads), model_type ``bert``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.models import hf_bert
from lmforge.models.encoder import EncoderLM
from lmforge.models.encoder_config import EncoderConfig
from lmforge.models.families.base import Family, register_family
from lmforge.models.flops import BERT_CONVENTION, FlopFormula, bert_flops_per_token, meta_params


def _state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: EncoderConfig,
                        source: str = "<state dict>") -> dict[str, torch.Tensor]:
    return hf_bert.state_dict_from_hf(hf_state, config, source)[0]  # head weights it lacks are left out


def _save(model: torch.nn.Module, path: str | Path, tokenizer: Any = None,
          generation_config: dict[str, Any] | None = None) -> Path:
    return hf_bert.save_bert(model, path, tokenizer=tokenizer)  # BERT does not generate: no generation config


FAMILY = register_family(Family(
    name="bert", model_types={"bert": "Bert"}, kind="encoder",
    config_class=EncoderConfig, model_class=EncoderLM,
    config_from_hf=EncoderConfig.from_hf, config_to_hf=EncoderConfig.to_hf,
    state_dict_to_hf=hf_bert.state_dict_to_hf, state_dict_from_hf=_state_dict_from_hf,
    hf_name=hf_bert.hf_module_name, lmforge_name=hf_bert.lmforge_module_name, load=hf_bert.load_bert, save=_save,
    pretrain_objective="mlm_nsp",
    finetune={"classification": "head", "token_classification": "token_head"},
    why_not={"text2text": "BERT has no decoder to generate text; use a gpt2/llama or t5 model, or a classification "
                          "task"},
    lora_targets=("query", "value"),
    # bert's FFN output 'output.dense' must not also match 'attention.output.dense': regexes
    adapter_sites=(r"(.*\.)?blocks\.\d+\.attention\.output\.dense", r"(.*\.)?blocks\.\d+\.output\.dense"),
    prefix_sites=("blocks.{i}.attention.self.key", "blocks.{i}.attention.self.value"),
    prefix_shape=lambda c: (c.n_layer, c.n_head, c.head_dim),
    classifier="pooled", token_classifier=True,
    flops=FlopFormula(meta_params(EncoderLM), bert_flops_per_token, BERT_CONVENTION),
))
