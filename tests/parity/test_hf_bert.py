"""Parity of lmforge's BERT with transformers (the reference), both directions, fp32: BertModel (sequence
output + pooled), BertForPreTraining (prediction + seq_relationship logits) and BertForMaskedLM, with
padding masks and token_type_ids; plus refused config fields and the tokenizer round trip."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.core.errors import ModelError  # noqa: E402
from lmforge.models.encoder import EncoderLM  # noqa: E402
from lmforge.models.encoder_config import EncoderConfig  # noqa: E402
from lmforge.models.hf_bert import (hf_module_name, lmforge_module_name, load_bert, save_bert,  # noqa: E402
                                    state_dict_to_hf)

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 120
MAX_ABS_DIFF: dict[str, float] = {}
HEADS_OF = {  # weights each HF class lacks from a BertForPreTraining checkpoint (reported as unused)
    "BertModel": {"cls.predictions.bias", "cls.predictions.transform.dense.weight",
                  "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
                  "cls.predictions.transform.LayerNorm.bias", "cls.seq_relationship.weight",
                  "cls.seq_relationship.bias"},
    "BertForMaskedLM": {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.seq_relationship.weight",
                        "cls.seq_relationship.bias"},
    "BertForPreTraining": set(),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_config(**kw):
    from transformers import BertConfig

    base = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=0, attn_implementation="eager")
    return BertConfig(**{**base, **kw})


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Random LayerNorms and biases (inits are 1 and 0) and larger weights, so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "LayerNorm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def _inputs(seed: int = 0):
    """Right-padded batch with segment ids: rows of 17, 11 and 5 real tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = [17, 11, 5]
    T = max(lengths)
    ids = torch.randint(5, VOCAB, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
        ids[r, n:] = 0
        types[r, n // 2:n] = 1
    return ids, mask, types


def _check(key: str, ours: torch.Tensor, ref: torch.Tensor, real: torch.Tensor | None = None) -> None:
    """Compare at real (non-pad) positions when ``real`` is given, else everywhere."""
    if real is not None:
        ours, ref = ours[real], ref[real]
    MAX_ABS_DIFF[key] = max(MAX_ABS_DIFF.get(key, 0.0), (ours - ref).abs().max().item())
    torch.testing.assert_close(ours, ref, **TOL)


def _compare_all(model: EncoderLM, hf_models: dict, tag: str) -> None:
    ids, mask, types = _inputs()
    real = mask.bool()
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, token_type_ids=types)
        pooled = model.pooled(hidden)
        for name, hf in hf_models.items():
            out = hf.eval()(ids, attention_mask=mask, token_type_ids=types)
            if name == "BertModel":
                _check(f"{tag} BertModel sequence", hidden, out.last_hidden_state, real)
                _check(f"{tag} BertModel pooled", pooled, out.pooler_output)
            elif name == "BertForPreTraining":
                _check(f"{tag} BertForPreTraining prediction_logits", model.mlm_logits(hidden),
                       out.prediction_logits, real)
                _check(f"{tag} BertForPreTraining seq_relationship", model.nsp_logits(pooled),
                       out.seq_relationship_logits)
            else:
                _check(f"{tag} BertForMaskedLM logits", model.mlm_logits(hidden), out.logits, real)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_to_lmforge(tmp_path, tie):
    from transformers import BertForMaskedLM, BertForPreTraining, BertModel

    torch.manual_seed(0)
    hf = BertForPreTraining(_hf_config(tie_word_embeddings=tie))
    _perturb(hf)
    hf.save_pretrained(tmp_path / "pt")
    model, tok = load_bert(tmp_path / "pt")
    assert tok is None and not model.training
    assert (model.predictions.decoder.weight is model.embeddings.word_embeddings.weight) == tie
    base = BertModel.from_pretrained(tmp_path / "pt", attn_implementation="eager")
    mlm = BertForMaskedLM.from_pretrained(tmp_path / "pt", attn_implementation="eager")
    _compare_all(model, {"BertModel": base, "BertForPreTraining": hf, "BertForMaskedLM": mlm}, f"hf->lm tie={tie}")


def test_hf_base_and_masked_lm_dirs_load(tmp_path):
    """A BertModel dir (no heads, no 'bert.' prefix) and a BertForMaskedLM dir (no pooler/NSP) load; the
    heads they lack are initialised with a warning and the rest matches."""
    from transformers import BertForMaskedLM, BertModel

    torch.manual_seed(0)
    mlm = BertForMaskedLM(_hf_config())
    _perturb(mlm, seed=2)
    mlm.save_pretrained(tmp_path / "mlm")
    with pytest.warns(UserWarning, match="seq_relationship"):
        model, _ = load_bert(tmp_path / "mlm")
    _compare_all(model, {"BertForMaskedLM": mlm}, "hf->lm mlm-dir")
    base = BertModel(_hf_config())
    _perturb(base, seed=3)
    base.save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match="predictions"):
        model, _ = load_bert(tmp_path / "base")
    _compare_all(model, {"BertModel": base}, "hf->lm base-dir")


def test_old_format_and_task_head_checkpoints(tmp_path):
    """pytorch_model.bin with TF-era LayerNorm names (gamma/beta), a position_ids buffer and the tied decoder
    weight stored; and a BertForSequenceClassification dir (its classifier is ignored with a warning)."""
    from transformers import BertForPreTraining, BertForSequenceClassification

    torch.manual_seed(0)
    hf = BertForPreTraining(_hf_config())
    _perturb(hf, seed=5)
    old = {}
    for k, v in hf.state_dict().items():
        if "LayerNorm" in k:
            k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old[k] = v.clone()
    old["bert.embeddings.position_ids"] = torch.arange(40)[None]
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "pytorch_model.bin")
    config = {**hf.config.to_dict(), "position_embedding_type": "absolute"}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    model, _ = load_bert(tmp_path / "old")
    _compare_all(model, {"BertForPreTraining": hf}, "hf->lm old-format")
    clf = BertForSequenceClassification(_hf_config(num_labels=3))
    clf.save_pretrained(tmp_path / "clf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_bert(tmp_path / "clf")
    said = " ".join(str(w.message) for w in caught)
    assert "ignoring 2 task-head weight(s) lmforge's BERT does not have (classifier" in said
    assert "no weights for 7 head parameter(s)" in said  # MLM head (5) and NSP (2); the pooler is there


@pytest.mark.parametrize("tie", [True, False])
def test_lmforge_to_hf(tmp_path, tie):
    from transformers import BertForMaskedLM, BertForPreTraining, BertModel

    cfg = EncoderConfig(vocab_size=VOCAB, d_model=48, n_layer=2, n_head=4, d_ff=80, max_seq_len=40,
                        dropout=0.0, attention_dropout=0.0, tie_embeddings=tie, pad_token_id=0)
    torch.manual_seed(0)
    model = EncoderLM(cfg).eval()
    _perturb(model, seed=4)
    save_bert(model, tmp_path / "m")
    hf_config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf_config["architectures"] == ["BertForPreTraining"] and hf_config["model_type"] == "bert"
    loaded = {}
    for cls in (BertModel, BertForPreTraining, BertForMaskedLM):
        hf, info = cls.from_pretrained(tmp_path / "m", output_loading_info=True, attn_implementation="eager")
        assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"], (cls, info)
        unused = HEADS_OF[cls.__name__]
        if not tie and cls is BertModel:  # an untied head stores its own decoder weight and bias
            unused = unused | {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
        assert set(info["unexpected_keys"]) == unused, (cls, info)
        loaded[cls.__name__] = hf
    pt = loaded["BertForPreTraining"]
    assert (pt.cls.predictions.decoder.weight.data_ptr() == pt.bert.embeddings.word_embeddings.weight.data_ptr()) == tie
    _compare_all(model, loaded, f"lm->hf tie={tie}")
    again, _ = load_bert(tmp_path / "m")
    assert again.config == cfg
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_files_as_transformers_writes(tmp_path):
    """The saved key set is exactly what transformers writes for BertForPreTraining."""
    from transformers import BertForPreTraining

    BertForPreTraining(_hf_config()).save_pretrained(tmp_path / "hf")
    model = EncoderLM(EncoderConfig(vocab_size=VOCAB, d_model=48, n_layer=2, n_head=4, d_ff=80, max_seq_len=40))
    save_bert(model, tmp_path / "lm")
    from safetensors.torch import load_file

    ours, theirs = (load_file(tmp_path / d / "model.safetensors") for d in ("lm", "hf"))
    assert ours.keys() == theirs.keys()


BASE = dict(model_type="bert", vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=80, max_position_embeddings=40)


@pytest.mark.parametrize("field,value", [
    ("position_embedding_type", "relative_key"),
    ("position_embedding_type", "relative_key_query"),
    ("is_decoder", True),
    ("add_cross_attention", True),
    ("hidden_act", "gelu_new"),
    ("hidden_act", "relu"),
    ("pruned_heads", {"0": [1]}),
])
def test_refused_fields(field, value):
    with pytest.raises(ModelError, match=f"field '{field}'") as e:
        EncoderConfig.from_hf({**BASE, field: value}, source="somedir")
    assert "\n" not in str(e.value) and "somedir" in str(e.value)


def test_config_defaults_and_other_model_types():
    cfg = EncoderConfig.from_hf(dict(BASE))
    assert (cfg.norm_eps, cfg.dropout, cfg.attention_dropout, cfg.pad_token_id, cfg.type_vocab_size) == (
        1e-12, 0.1, 0.1, 0, 2)
    assert EncoderConfig.from_hf(cfg.to_hf()) == cfg
    with pytest.raises(ModelError, match="model_type 'roberta'"):
        EncoderConfig.from_hf({**BASE, "model_type": "roberta"})


def test_missing_encoder_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_bert(EncoderLM(EncoderConfig(vocab_size=VOCAB, d_model=48, n_layer=2, n_head=4, max_seq_len=40)),
              tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    del sd["bert.encoder.layer.1.attention.self.key.weight"]
    save_file(sd, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelError, match="bert.encoder.layer.1.attention.self.key.weight"):
        load_bert(tmp_path / "m")


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    from lmforge.core.tokenizer import Tokenizer

    texts = ["the cat sat on the mat", "a dog ran in the park"] * 20
    tok = Tokenizer.train(texts, 300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    model = EncoderLM(EncoderConfig(vocab_size=300, d_model=32, n_layer=1, n_head=2, max_seq_len=32,
                                    pad_token_id=tok.pad_id))
    save_bert(model, tmp_path / "m", tokenizer=tok)
    _, tok2 = load_bert(tmp_path / "m")
    assert tok2.fingerprint == tok.fingerprint
    assert (tok2.cls_id, tok2.sep_id, tok2.mask_id, tok2.pad_id) == (2, 3, 4, 0)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert (hf_tok.mask_token, hf_tok.cls_token, hf_tok.sep_token, hf_tok.pad_token) == (
        "[MASK]", "[CLS]", "[SEP]", "[PAD]")
    assert hf_tok.model_max_length == 32


def test_module_name_map():
    model = EncoderLM(EncoderConfig(vocab_size=VOCAB, d_model=48, n_layer=2, n_head=4, max_seq_len=40))
    for name, _ in model.named_modules():
        if name:
            assert lmforge_module_name(hf_module_name(name)) == name
    assert hf_module_name("blocks.1.attention.self.query.lora_A") == "bert.encoder.layer.1.attention.self.query.lora_A"
    assert hf_module_name("blocks.0.output.dense", base_model=True) == "encoder.layer.0.output.dense"
    assert lmforge_module_name("encoder.layer.0.intermediate.dense") == "blocks.0.intermediate.dense"
    from transformers import BertForPreTraining

    assert set(state_dict_to_hf(model)) == set(BertForPreTraining(_hf_config()).state_dict()) - {
        "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    with pytest.raises(ModelError):
        hf_module_name("lm_head")
