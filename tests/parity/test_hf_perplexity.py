"""Perplexity: lmforge's sliding-window evaluation equals the same computation done with transformers
(the Hugging Face perplexity guide's loop, written out here), plus the window arithmetic, bits-per-byte
and the unigram baseline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.tokenizer import Tokenizer
from lmforge.eval.perplexity import (perplexity, perplexity_of_tokens, sliding_windows,
                                     unigram_perplexity)

VOCAB = 384
CORPUS = [
    "The river Olm runs past the mill of Tarsk, where the miller Edda grinds barley every autumn.",
    "Edda has three sons; the eldest, Bran, keeps bees on the hill above the village.",
    "In 1204 a flood carried away the old bridge, and the people of Tarsk built a ferry instead.",
    "A ferry costs two copper coins; children and goats cross for free on market days.",
    "Bran's honey is sold in Velm, a town of weavers two days to the north by the river road.",
]
TEXT = " ".join(CORPUS * 6)  # ASCII only: every token owns exactly the bytes of its own text
UNICODE_TEXT = "Größe: 3 × 4 — naïve café, 日本語のテキスト, emoji 🙂 and more. " * 12


# --------------------------------------------------------------------------------------------------
# Window arithmetic (model-free)
# --------------------------------------------------------------------------------------------------


def _scored(n, max_length, stride):
    out = []
    for _, e, f in sliding_windows(n, max_length, stride):
        out += list(range(f, e))
    return out


def test_windows_overlapping_score_every_token_but_the_first_once():
    for n, L, s in [(10, 4, 2), (11, 4, 3), (100, 16, 5), (3, 8, 4), (17, 16, 1)]:
        assert _scored(n, L, s) == list(range(1, n))


def test_windows_disjoint_skip_each_window_start():
    assert sliding_windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert _scored(10, 4, 4) == [1, 2, 3, 5, 6, 7, 9]


def test_windows_hf_guide_loop():
    """The HF guide's loop: for begin in range(0, n, stride) ... trg_len = end - prev_end ... break."""
    for n, L, s in [(50, 8, 3), (50, 8, 8), (9, 8, 7), (64, 16, 16), (65, 16, 16)]:
        ref, prev_end = [], 0
        for begin in range(0, n, s):
            end = min(begin + L, n)
            trg_len = end - prev_end
            # labels[-trg_len:] kept; the shift drops the window's own first label.
            ref += [i for i in range(end - trg_len, end) if i > begin]
            prev_end = end
            if end == n:
                break
        assert _scored(n, L, s) == ref


def test_windows_reject_bad_lengths():
    with pytest.raises(ConfigError, match="stride"):
        sliding_windows(10, 4, 5)
    with pytest.raises(ConfigError, match="max_length"):
        sliding_windows(10, 1, 1)


def test_unigram_perplexity_add_one():
    train = [0, 0, 1, 2]
    ev = [0, 3]
    # p(0) = (2+1)/(4+4), p(3) = (0+1)/(4+4)
    nll = -(math.log(3 / 8) + math.log(1 / 8))
    out = unigram_perplexity(train, np.array(ev), vocab_size=4)
    assert out["tokens"] == 2
    assert out["nll"] == pytest.approx(nll)
    assert out["perplexity"] == pytest.approx(math.exp(nll / 2))


# --------------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS * 4 + [UNICODE_TEXT], vocab_size=VOCAB)


def _hf_model(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        cls = GPT2LMHeadModel
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False)
        cls = LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights than the default init so the NLL is far from uniform
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama_gqa"])
def pair(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from lmforge.models.io import load_model

    hf = _hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    model, _ = load_model(d)
    return hf, model


def _hf_reference(hf, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The HF perplexity guide's loop; HF's loss is a mean over the shifted, non-ignored labels, so it
    is multiplied back by that count and summed."""
    enc = torch.tensor([ids])
    n = enc.shape[1]
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        input_ids = enc[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        n_valid = int((labels[:, 1:] != -100).sum())
        if n_valid:
            with torch.no_grad():
                loss = hf(input_ids, labels=labels).loss
            nll_sum += float(loss) * n_valid
            count += n_valid
        prev_end = end
        if end == n:
            break
    return nll_sum, count


@pytest.mark.parametrize("max_length,stride", [(64, 16), (64, 64), (48, 20)])
def test_perplexity_equals_transformers(pair, tokenizer, max_length, stride):
    hf, model = pair
    ids = tokenizer.encode(TEXT)
    assert len(ids) > 3 * max_length
    ref_nll, ref_count = _hf_reference(hf, ids, max_length, stride)
    out = perplexity(model, tokenizer, TEXT, max_length=max_length, stride=stride, batch_size=3)
    assert out["tokens"] == ref_count
    assert out["nll"] == pytest.approx(ref_nll, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(ref_nll / ref_count), rel=1e-5)
    # Bits per byte over the scored text.  ASCII text: a token's bytes are its own decoded text.
    scored = _scored(len(ids), max_length, stride)
    n_bytes = sum(len(tokenizer.decode([ids[i]]).encode("utf-8")) for i in scored)
    if stride < max_length:  # everything after the first token
        assert n_bytes == len(TEXT.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    assert out["bytes"] == n_bytes
    assert out["bits_per_byte"] == pytest.approx(ref_nll / (math.log(2) * n_bytes), rel=1e-5)
    # Window batching does not change the result.
    one = perplexity_of_tokens(model, ids, max_length=max_length, stride=stride, batch_size=1)
    assert one["nll"] == pytest.approx(out["nll"], rel=1e-6)


def test_bytes_of_unicode_text(pair, tokenizer):
    _, model = pair
    ids = tokenizer.encode(UNICODE_TEXT)
    out = perplexity(model, tokenizer, UNICODE_TEXT, max_length=64, stride=32)
    assert out["tokens"] == len(ids) - 1
    first_end = tokenizer.hf.encode(UNICODE_TEXT).offsets[0][1]
    assert out["bytes"] == len(UNICODE_TEXT[first_end:].encode("utf-8"))
    # Disjoint windows score fewer bytes, all of them inside the text.
    out2 = perplexity(model, tokenizer, UNICODE_TEXT, max_length=64, stride=64)
    assert out2["tokens"] < out["tokens"] and 0 < out2["bytes"] < out["bytes"]


def test_documents_joined_with_eos(pair, tokenizer):
    _, model = pair
    docs = CORPUS[:3]
    joined: list[int] = []
    for i, d in enumerate(docs):
        joined += ([tokenizer.eos_id] if i else []) + tokenizer.encode(d)
    out = perplexity(model, tokenizer, docs, max_length=32, stride=16)
    ref = perplexity_of_tokens(model, joined, max_length=32, stride=16)
    assert out["tokens"] == ref["tokens"] == len(joined) - 1
    assert out["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    first = len(tokenizer.decode(tokenizer.encode(docs[0])[:1]).encode())
    assert out["bytes"] == sum(len(d.encode()) for d in docs) - first  # EOS tokens own no bytes


def test_default_lengths_and_errors(pair, tokenizer):
    _, model = pair
    out = perplexity(model, tokenizer, TEXT)  # max_length = the model's 64, stride = max_length
    ids = tokenizer.encode(TEXT)
    assert out["tokens"] == len(_scored(len(ids), 64, 64))
    with pytest.raises(ConfigError, match="exceeds"):
        perplexity(model, tokenizer, TEXT, max_length=128)
    with pytest.raises(DataError):
        perplexity(model, tokenizer, "")
    with pytest.raises(DataError, match="at least 2 tokens"):
        perplexity_of_tokens(model, [5], max_length=8)


# --------------------------------------------------------------------------------------------------
# `lmforge eval perplexity --data FILE.txt` against transformers on the file's text tokenised whole
# --------------------------------------------------------------------------------------------------

PROSE = "\n\n".join("\n".join(CORPUS[i:i + 2]) for i in range(0, len(CORPUS), 2)) * 3 + "\n"  # paragraphs


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir_with_tokenizer(request, tmp_path_factory, tokenizer):
    """A random transformers model saved with an lmforge tokenizer; the Llama's tokenizer adds BOS, as Llama's do,
    so the BOS rule (BOS only where the tokenizer adds it, like transformers) is part of the comparison."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    hf = _hf_model(request.param)
    d = tmp_path_factory.mktemp(f"{request.param}-dir")
    hf.save_pretrained(d)
    tok = tokenizer
    if request.param == "llama":
        bos = tokenizer.hf.id_to_token(tokenizer.bos_id)
        copy = HFTokenizer.from_str(tokenizer.hf.to_str())
        copy.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_id)])
        tok = Tokenizer(copy)
        assert tok.adds_bos
    tok.save(d)
    return hf, d, tok


@pytest.mark.parametrize("stride", [None, 64])
def test_eval_perplexity_of_a_txt_file_equals_transformers(model_dir_with_tokenizer, tmp_path, stride):
    from transformers import AutoTokenizer

    from tests.conftest import cli

    hf, d, tok = model_dir_with_tokenizer
    text_file = tmp_path / "prose.txt"
    text_file.write_text(PROSE, encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(d)(text_file.read_text(encoding="utf-8"))["input_ids"]
    assert len(ids) > 3 * 64 and (ids[0] == tok.bos_id) == tok.adds_bos  # BOS where the tokenizer adds it
    flags = [] if stride is None else ["--stride", str(stride)]
    proc = cli("eval", "perplexity", "--model", str(d), "--data", str(text_file), "--json", "--device", "cpu", *flags)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # a transformers dir records no training window: the model's 64 positions, half of them the default stride
    assert (out["window"], out["window_from"], out["stride"]) == (64, "model context", stride or 32)
    ref_nll, ref_count = _hf_reference(hf, ids, 64, out["stride"])
    assert out["tokens"] == ref_count
    assert out["nll"] == pytest.approx(ref_nll, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(ref_nll / ref_count), rel=1e-5)
