"""Parity of lmforge's classifiers with transformers' task models, both directions, fp32: GPT-2, Llama (GQA,
untied), Qwen2 and BERT sequence classification, BERT token classification; 3 labels, a right-padded
batch whose pad id differs from EOS, eval mode, no dropout."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.encoder import EncoderLM  # noqa: E402
from lmforge.models.encoder_config import EncoderConfig  # noqa: E402
from lmforge.models.io import load_model, save_model  # noqa: E402
from lmforge.models.hf_task import is_task_dir  # noqa: E402
from lmforge.models.task import SequenceClassifier, TokenClassifier  # noqa: E402

VOCAB = 120
PAD, BOS, EOS = 0, 1, 2
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
MAX_ABS_DIFF: dict[str, float] = {}
KINDS = ["gpt2", "llama", "qwen2", "bert_seq", "bert_tok"]
ARCH = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
        "qwen2": "Qwen2ForSequenceClassification", "bert_seq": "BertForSequenceClassification",
        "bert_tok": "BertForTokenClassification"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Random norms and biases (inits are 1 and 0) and larger weights, so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and any(s in name for s in ("norm", "ln_", "LayerNorm")) and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows of 11, 7 and 3 real tokens, each ending in EOS (so reading the token before a
    final EOS, as pad == EOS would make transformers do, shows up); no real token is PAD."""
    g = torch.Generator().manual_seed(seed)
    lengths = [11, 7, 3]
    ids = torch.randint(3, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, n - 1] = EOS
        ids[r, n:] = PAD
        mask[r, :n] = 1
        types[r, n // 2:n] = 1
    return ids, mask, types


def _lmforge_model(kind: str) -> SequenceClassifier | TokenClassifier:
    torch.manual_seed(0)
    if kind.startswith("bert"):
        cfg = EncoderConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=32,
                            dropout=0.0, attention_dropout=0.0, pad_token_id=PAD)
        cls = TokenClassifier if kind == "bert_tok" else SequenceClassifier
        return cls(EncoderLM(cfg), LABELS).eval()
    extra = {"gpt2": {}, "llama": dict(n_kv_head=2, tie_embeddings=False),
             "qwen2": dict(n_kv_head=1, qkv_bias=True, tie_embeddings=False)}[kind]
    cfg = DecoderConfig(family="gpt2" if kind == "gpt2" else "llama", vocab_size=VOCAB, d_model=32, n_layer=2,
                        n_head=4, d_ff=48, max_seq_len=32, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                        **extra)
    return SequenceClassifier(DecoderLM(cfg), LABELS).eval()


def _hf_model(kind: str):
    from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification, GPT2Config,
                              GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                              Qwen2Config, Qwen2ForSequenceClassification)

    labels = dict(id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, attn_implementation="eager")
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **labels)
    if kind == "gpt2":
        model = GPT2ForSequenceClassification(GPT2Config(
            vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **labels))
    elif kind == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(**common, num_key_value_heads=2))
    elif kind == "qwen2":
        model = Qwen2ForSequenceClassification(Qwen2Config(**common, num_key_value_heads=1))
    else:
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, pad_token_id=PAD, **labels)
        cls = BertForTokenClassification if kind == "bert_tok" else BertForSequenceClassification
        model = cls(cfg)
    return model.eval()


def _compare(key: str, ours: torch.nn.Module, hf: torch.nn.Module, kind: str) -> None:
    ids, mask, types = _batch()
    kw = dict(token_type_ids=types) if kind.startswith("bert") else {}
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, **kw)
        b = hf(ids, attention_mask=mask, **kw).logits
    assert a.shape == b.shape == ((3, max(mask.sum(1)), 3) if kind == "bert_tok" else (3, 3))
    if kind == "bert_tok":  # padding positions are nobody's prediction
        a, b = a[mask.bool()], b[mask.bool()]
    MAX_ABS_DIFF[key] = diff = (a - b).abs().max().item()
    assert diff <= 1e-5, f"{key}: max |diff| {diff}"


@pytest.mark.parametrize("kind", KINDS)
def test_lmforge_to_hf(tmp_path, kind):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    model = _lmforge_model(kind)
    _perturb(model)
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == [ARCH[kind]]
    assert config["id2label"] == {str(i): n for i, n in LABELS.items()}
    assert config["label2id"] == {n: i for i, n in LABELS.items()}
    assert config.get("problem_type") == (None if kind == "bert_tok" else "single_label_classification")
    assert is_task_dir(tmp_path / "m") == ("token_classification" if kind == "bert_tok" else "sequence_classification")
    auto = AutoModelForTokenClassification if kind == "bert_tok" else AutoModelForSequenceClassification
    hf, info = auto.from_pretrained(tmp_path / "m", output_loading_info=True, attn_implementation="eager")
    assert type(hf).__name__ == ARCH[kind]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.id2label == LABELS and hf.config.label2id == {n: i for i, n in LABELS.items()}
    assert hf.config.num_labels == 3 and hf.config.pad_token_id == PAD
    _compare(f"lm->hf {kind}", model, hf.eval(), kind)
    # and back: lmforge reads its own directory to the same logits (LM heads it lacks initialised silently)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, tok = load_model(tmp_path / "m")
    assert tok is None and not again.training and type(again) is type(model) and again.id2label == LABELS
    _compare(f"lm->lm {kind}", again, hf, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_hf_to_lmforge(tmp_path, kind):
    torch.manual_seed(0)
    hf = _hf_model(kind)
    _perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no lm_head / MLM / NSP weights in the dir: not worth a warning
        model, _ = load_model(tmp_path / "hf")
    assert isinstance(model, TokenClassifier if kind == "bert_tok" else SequenceClassifier)
    assert model.id2label == LABELS and model.label2id == {n: i for i, n in LABELS.items()}
    assert not model.training and not any(p.is_meta for p in model.parameters())
    _compare(f"hf->lm {kind}", model, hf, kind)
