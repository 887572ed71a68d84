"""Unit tests of lmforge.models.task / hf_task: decoder pooling, vocabulary growth, pad tokens, refusals,
meta-build init, and task-directory checks (no transformers needed)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.core.errors import ConfigError, ModelError
from lmforge.core.tokenizer import Tokenizer
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.encdec import EncoderDecoderLM
from lmforge.models.t5_layers import T5Config
from lmforge.models.encoder import EncoderLM
from lmforge.models.encoder_config import EncoderConfig
from lmforge.models.io import load_model, save_model
from lmforge.models.hf_task import is_task_dir, load_task_model
from lmforge.models.task import (PAD_TOKEN, SequenceClassifier, TokenClassifier, ensure_pad_token, last_token,
                                 resize_token_embeddings)

V = 100
LABELS = ["a", "b", "c"]
CORPUS = ["the cat sat on the mat", "a dog and a cat", "the mat was red and the dog was not"] * 5


pytestmark = pytest.mark.usefixtures("one_thread")


def dec_cfg(family: str = "gpt2", **kw) -> DecoderConfig:
    base = dict(family=family, vocab_size=V, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=32,
                eos_token_id=2, pad_token_id=0)
    if family == "llama":
        base.update(n_kv_head=2, tie_embeddings=False)
    return DecoderConfig(**{**base, **kw})


def enc_cfg(**kw) -> EncoderConfig:
    return EncoderConfig(**{**dict(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=32,
                                   dropout=0.0, attention_dropout=0.0, pad_token_id=0), **kw})


# ---- pooling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_pools_last_real_token(family):
    torch.manual_seed(0)
    clf = SequenceClassifier(DecoderLM(dec_cfg(family)), LABELS).eval()
    ids = torch.randint(3, V, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # row 0: 5 real tokens, right padding
    ids[0, 5:] = 0
    with torch.no_grad():
        base = clf(ids, mask)
        pad_changed = ids.clone()
        pad_changed[0, 6] = 7  # a padded position: invisible
        torch.testing.assert_close(clf(pad_changed, mask), base, rtol=0, atol=0)
        last_changed = ids.clone()
        last_changed[0, 4] = (ids[0, 4] + 1) % V  # the last real token: the vector that is read
        out = clf(last_changed, mask)
        assert not torch.allclose(out[0], base[0]) and torch.equal(out[1], base[1])
        # the pooled vector is the hidden state at index 4 (row 0) and 7 (row 1); no mask = last position
        hidden = clf.features(ids, mask)
        torch.testing.assert_close(last_token(hidden, mask), torch.stack([hidden[0, 4], hidden[1, 7]]))
        torch.testing.assert_close(last_token(hidden, None), hidden[:, -1])
        torch.testing.assert_close(clf.classify(hidden, mask), base)


def test_bert_heads_shapes_and_dropout():
    torch.manual_seed(0)
    seq = SequenceClassifier(EncoderLM(enc_cfg(dropout=0.1)), {0: "x", 1: "y"})
    tok = TokenClassifier(EncoderLM(enc_cfg()), LABELS, dropout=0.3)
    assert seq.dropout == 0.1 and tok.dropout == 0.3  # default: the backbone's hidden dropout
    assert seq.classifier.bias is not None and seq.label2id == {"x": 0, "y": 1} and seq.num_labels == 2
    ids = torch.randint(3, V, (2, 6))
    assert seq.eval()(ids).shape == (2, 2) and tok.eval()(ids, torch.ones_like(ids)).shape == (2, 6, 3)
    dec = SequenceClassifier(DecoderLM(dec_cfg()), LABELS)
    assert dec.score.bias is None and dec.config is dec.backbone.config and dec.dtype == torch.float32
    with pytest.raises(ValueError, match="token_type_ids"):
        dec(ids, token_type_ids=torch.zeros_like(ids))


# ---- refusals --------------------------------------------------------------------------------------

def test_refusals():
    t5 = EncoderDecoderLM(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4),
                          device="meta")
    with pytest.raises(ConfigError, match="T5 classifies as text-to-text.*'text2text'"):
        SequenceClassifier(t5, LABELS)
    for backbone in (DecoderLM(dec_cfg(), device="meta"), t5):
        with pytest.raises(ConfigError, match=r"token classification needs an encoder \(bert\)"):
            TokenClassifier(backbone, LABELS)
    meta = DecoderLM(dec_cfg(), device="meta")
    with pytest.raises(ConfigError, match="no classifier dropout"):
        SequenceClassifier(meta, LABELS, dropout=0.1)
    for bad, msg in [(["a"], "at least 2"), (["a", "a"], "duplicates"), ({0: "a", 2: "b"}, "exactly 0..1"),
                     ("ab", "must be a list"), ({"x": "a", "y": "b"}, "integer class ids")]:
        with pytest.raises(ConfigError, match=msg):
            SequenceClassifier(meta, bad)


# ---- init ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert_seq", "bert_tok"])
def test_meta_build_then_reset_equals_eager(kind):
    def build():
        if kind.startswith("bert"):
            cls = TokenClassifier if kind == "bert_tok" else SequenceClassifier
            return cls(EncoderLM(enc_cfg()), LABELS)
        return SequenceClassifier(DecoderLM(dec_cfg(kind)), LABELS)

    torch.manual_seed(3)
    eager = build()
    with torch.device("meta"):
        lazy = build()
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    torch.manual_seed(3)
    lazy.backbone.reset_parameters()  # as the eager build: backbone first, then the head
    lazy.reset_parameters()
    a, b = eager.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    head = eager.head
    assert head.weight.std().item() == pytest.approx(0.02, rel=0.5)
    assert head.bias is None or not head.bias.any()
    torch.manual_seed(4)
    before = {k: v.clone() for k, v in eager.backbone.state_dict().items()}
    head_before = eager.head.weight.detach().clone()
    eager.reset_parameters()  # head only
    assert all(torch.equal(v, eager.backbone.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(eager.head.weight, head_before)


# ---- vocabulary growth and pad tokens --------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_resize_token_embeddings_keeps_old_rows(tie):
    torch.manual_seed(0)
    model = DecoderLM(dec_cfg(tie_embeddings=tie)).eval()
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        before = model.logits(model(ids))
    emb = model.embed_tokens.weight.detach().clone()
    resize_token_embeddings(model, V + 3)
    assert model.config.vocab_size == V + 3 and model.embed_tokens.weight.shape == (V + 3, 32)
    assert model.lm_head.weight.shape == (V + 3, 32) and model.lm_head.out_features == V + 3
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    assert torch.equal(model.embed_tokens.weight[:V], emb)
    torch.testing.assert_close(model.embed_tokens.weight[V:], emb.mean(0).expand(3, -1))
    with torch.no_grad():
        after = model.logits(model(ids))
    assert after.shape[-1] == V + 3
    torch.testing.assert_close(after[..., :V], before, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="only growing"):
        resize_token_embeddings(model, V)


@pytest.fixture(scope="module")
def no_pad_tokenizer():
    tok = Tokenizer.train(CORPUS, vocab_size=270, special_tokens=["<|endoftext|>"])
    assert tok.pad_id is None and tok.eos_id == 0
    return tok


def _copy(tok: Tokenizer) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    return Tokenizer(HFTokenizer.from_str(tok.hf.to_str()), eos_token=tok.eos_token, pad_token=tok.pad_token,
                     guess_roles=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ensure_pad_token_adds_pad_and_grows_model(tmp_path, no_pad_tokenizer, family):
    tok = _copy(no_pad_tokenizer)
    n = tok.vocab_size
    torch.manual_seed(0)
    clf = SequenceClassifier(DecoderLM(dec_cfg(family, vocab_size=n, eos_token_id=0, pad_token_id=None)), LABELS)
    pad = ensure_pad_token(clf, tok)
    assert pad == n == tok.pad_id and tok.pad_token == PAD_TOKEN and pad != tok.eos_id
    assert tok.vocab_size == n + 1 and clf.config.vocab_size == n + 1 and clf.config.pad_token_id == pad
    assert clf.backbone.embed_tokens.weight.shape[0] == n + 1
    assert tok.encode(f"the cat{PAD_TOKEN}")[-1] == pad  # a special token: never split
    assert ensure_pad_token(clf, tok) == pad and tok.vocab_size == n + 1  # idempotent
    save_model(clf.eval(), tmp_path / "m", tokenizer=tok)
    saved = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert saved["pad_token"] == PAD_TOKEN
    assert Tokenizer.load(tmp_path / "m").pad_id == pad
    again, tok2 = load_model(tmp_path / "m")
    assert tok2.pad_id == pad and again.config.pad_token_id == pad and again.config.vocab_size == n + 1


def test_ensure_pad_token_replaces_pad_equal_to_eos_without_growing(no_pad_tokenizer):
    tok = _copy(no_pad_tokenizer)
    tok = Tokenizer(tok.hf, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert tok.pad_id == tok.eos_id
    model = DecoderLM(dec_cfg(vocab_size=tok.vocab_size + 8, eos_token_id=0, pad_token_id=0))  # room to spare
    pad = ensure_pad_token(model, tok)
    assert pad == tok.pad_id != tok.eos_id and model.config.vocab_size == tok.vocab_size + 7
    assert model.config.pad_token_id == pad
    # a tokenizer with its own pad: kept, the model just learns its id
    tok3 = Tokenizer.train(CORPUS, vocab_size=270)
    model3 = DecoderLM(dec_cfg(vocab_size=tok3.vocab_size, pad_token_id=None))
    assert ensure_pad_token(model3, tok3) == tok3.pad_id == model3.config.pad_token_id
    assert tok3.vocab_size == model3.config.vocab_size
    with pytest.raises(ConfigError, match="decoder models"):
        ensure_pad_token(EncoderLM(enc_cfg(), device="meta"), tok3)


# ---- task directories ------------------------------------------------------------------------------

def test_task_dirs_and_missing_head(tmp_path):
    torch.manual_seed(0)
    lm = DecoderLM(dec_cfg())
    save_model(lm, tmp_path / "lm")
    assert is_task_dir(tmp_path / "lm") is None and is_task_dir(tmp_path / "nothing") is None
    with pytest.raises(ModelError, match="name no"):
        load_task_model(tmp_path / "lm")
    # an LM checkpoint relabelled as a classifier has no score weight
    cfg = json.loads((tmp_path / "lm" / "config.json").read_text())
    relabel = {**cfg, "architectures": ["GPT2ForSequenceClassification"]}
    (tmp_path / "lm" / "config.json").write_text(json.dumps(relabel))
    assert is_task_dir(tmp_path / "lm") == "sequence_classification"
    with pytest.raises(ModelError, match=r"no 'score.weight'"):
        load_model(tmp_path / "lm")
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2ForTokenClassification"]}))
    with pytest.raises(ModelError, match=r"token classification needs an encoder \(bert\)"):
        load_model(tmp_path / "lm")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5",
                                                              "architectures": ["T5ForSequenceClassification"]}))
    with pytest.raises(ModelError, match="T5 classifies as text-to-text"):
        load_model(tmp_path / "t5")
    # a decoder classifier without pad id: transformers could not batch it
    with pytest.warns(UserWarning, match="without pad_token_id.*ensure_pad_token"):
        save_model(SequenceClassifier(DecoderLM(dec_cfg(pad_token_id=None)), LABELS), tmp_path / "nopad")
    # a BERT sequence classifier whose directory lacks the pooler it reads
    clf = SequenceClassifier(EncoderLM(enc_cfg()), LABELS)
    save_model(clf, tmp_path / "seq")
    from safetensors.torch import load_file, save_file

    weights = {k: v for k, v in load_file(str(tmp_path / "seq" / "model.safetensors")).items() if "pooler" not in k}
    save_file(weights, str(tmp_path / "seq" / "model.safetensors"))
    with pytest.raises(ModelError, match="no pooler weights"):
        load_model(tmp_path / "seq")
    # id2label that does not fit the head
    save_model(clf, tmp_path / "seq")
    cfg = json.loads((tmp_path / "seq" / "config.json").read_text())
    (tmp_path / "seq" / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "x", "1": "y"}}))
    with pytest.raises(ModelError, match="names 2 labels but the classifier head has 3 rows"):
        load_model(tmp_path / "seq")


def test_bert_classifier_dropout_round_trip(tmp_path):
    torch.manual_seed(0)
    tok_clf = TokenClassifier(EncoderLM(enc_cfg(dropout=0.1)), LABELS, dropout=0.25)
    save_model(tok_clf, tmp_path / "tok")
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert cfg["classifier_dropout"] == 0.25 and "problem_type" not in cfg
    assert not any(k.startswith(("cls.", "bert.pooler")) for k in _keys(tmp_path / "tok"))
    loaded, _ = load_model(tmp_path / "tok", dtype=None)
    assert isinstance(loaded, TokenClassifier) and loaded.dropout == 0.25
    seq = SequenceClassifier(EncoderLM(enc_cfg(dropout=0.1)), LABELS)
    save_model(seq, tmp_path / "seq")
    assert json.loads((tmp_path / "seq" / "config.json").read_text())["classifier_dropout"] is None
    assert load_model(tmp_path / "seq")[0].dropout == 0.1


def _keys(d) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return list(f.keys())
