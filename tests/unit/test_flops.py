"""FLOP formulas of every family against torch's own counter (FlopCounterMode) on a forward + backward.

The counter sees every matmul (Linear, bmm, and SDPA's math kernel, forced here so the attention products are
counted as matmuls); each family's formula, reached through the family registry, must be within 5 % of it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.encoder_config import EncoderConfig
from lmforge.models.families import get_family
from lmforge.models.families.base import flop_formula, model_params, train_flops_per_token
from lmforge.models.flops import count_params
from lmforge.models.t5_layers import T5Config

B, T = 2, 64


def _counted(loss_fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return counter.get_total_flops()


DECODERS = {
    "gpt2": DecoderConfig(family="gpt2", vocab_size=512, d_model=64, n_layer=2, n_head=4, max_seq_len=T),
    "llama": DecoderConfig(family="llama", vocab_size=512, d_model=64, n_layer=2, n_head=4,
                           n_kv_head=2, max_seq_len=T, tie_embeddings=False),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_flops_match_counter(name):
    torch.manual_seed(0)
    cfg = DECODERS[name]
    model = get_family(name).model_class(cfg)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    counted = _counted(lambda: model.logits(model(ids)).float().logsumexp(-1).sum())
    predicted = train_flops_per_token(cfg, T) * B * T
    assert abs(predicted / counted - 1) < 0.05, (predicted, counted)


def test_bert_flops_count_the_mlm_head_at_masked_positions_only():
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=512, d_model=64, n_layer=2, n_head=4, max_seq_len=T, dropout=0.0,
                        attention_dropout=0.0)
    model = get_family("bert").model_class(cfg)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    selected = torch.zeros(B, T, dtype=torch.bool)
    selected[:, ::8] = True  # 12.5 % of the positions carry a target

    def loss():
        hidden = model(ids, token_type_ids=torch.zeros_like(ids))
        mlm = model.mlm_logits(hidden, selected)
        return mlm.logsumexp(-1).sum() + model.nsp_logits(model.pooled(hidden)).sum()

    counted = _counted(loss)
    predicted = train_flops_per_token(cfg, T, mask_rate=0.125) * B * T
    assert abs(predicted / counted - 1) < 0.05, (predicted, counted)
    # the head at every position would be far off: the formula's mask_rate term is doing real work
    assert train_flops_per_token(cfg, T, mask_rate=1.0) * B * T / counted > 1.2


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_t5_flops_match_counter_per_stack_with_cross_attention(ff):
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=3, num_heads=4,
                   feed_forward_proj=ff)
    model = get_family("t5").model_class(cfg)
    Td = 16  # span corruption: targets much shorter than inputs
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    dec = torch.randint(0, cfg.vocab_size, (B, Td))
    counted = _counted(lambda: model.logits(model(ids, decoder_input_ids=dec)).logsumexp(-1).sum())
    predicted = train_flops_per_token(cfg, T, target_len=Td) * B * T
    assert abs(predicted / counted - 1) < 0.05, (predicted, counted)
    # treating the decoder like the encoder (Td = Te) is wrong by far more than the tolerance
    assert train_flops_per_token(cfg, T, target_len=T) * B * T / counted > 1.5


@pytest.mark.parametrize("cfg", [DECODERS["gpt2"], DECODERS["llama"], EncoderConfig(vocab_size=300, d_model=32),
                                 T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)])
def test_param_formulas_match_the_built_model(cfg):
    model = get_family(cfg.family).model_class(cfg)
    assert model_params(cfg, True) == count_params(model, non_embedding=True)
    assert model_params(cfg, False) == count_params(model, non_embedding=False)


def test_every_built_in_family_states_its_convention():
    for name in ("gpt2", "llama", "bert", "t5"):
        cfg = {"gpt2": DECODERS["gpt2"], "llama": DECODERS["llama"], "bert": EncoderConfig(),
               "t5": T5Config()}[name]
        assert "FLOPs" in flop_formula(cfg).convention


def test_a_family_without_a_formula_is_one_clear_error():
    from lmforge.core.errors import ConfigError
    from lmforge.models.families import base

    fam = dataclasses.replace(get_family("gpt2"), name="noflops", model_types={}, flops=None)
    base._FAMILIES["noflops"] = fam
    try:
        with pytest.raises(ConfigError, match="registers no FLOP formula"):
            train_flops_per_token(type("C", (), {"family": "noflops"})(), 16)
    finally:
        del base._FAMILIES["noflops"]


def test_a_registered_family_brings_its_formula_through_the_registry():
    from tests.toy_family import FAMILY  # registers "toy" (llama with a GELU MLP)

    cfg = FAMILY.config_class(vocab_size=512, d_model=64, n_layer=2, n_head=4, max_seq_len=T)
    model = FAMILY.model_class(cfg)
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    counted = _counted(lambda: model.logits(model(ids)).float().logsumexp(-1).sum())
    assert abs(train_flops_per_token(cfg, T) * B * T / counted - 1) < 0.05
