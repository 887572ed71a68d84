"""Tokenizer: byte-level BPE training, determinism, HF format round trips and parity with transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A cat sat on the mat; the mat was red and the cat was grey.",
    "Numbers: 12, 345, 6789. Dates: 2024-01-02. Émile aime les crêpes.",
    "def f(x):\n    return x * 2\n",
] * 20

HARD_TEXT = "Hello wörld! 你好 🙂 tabs\tand\nnewlines  <|endoftext|> end"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=400)


def test_train_defaults(tok: Tokenizer):
    assert 258 < tok.vocab_size <= 400  # a tiny corpus may run out of merges before 400
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>"
    assert tok.bos_id == tok.eos_id == 0 and tok.pad_id == 1
    assert tok.pad_id != tok.eos_id
    assert tok.unk_id is None and tok.mask_id is None
    assert tok.token_to_id("<|pad|>") == 1
    assert tok.special_ids == [0, 1]
    assert not tok.adds_bos


def test_any_text_round_trips(tok: Tokenizer):
    ids = tok.encode(HARD_TEXT)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == HARD_TEXT
    assert tok.eos_id in ids  # special tokens in text are recognised
    assert tok.eos_token not in tok.decode(ids, skip_special_tokens=True)
    # learned merges compress common words
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")


def test_encode_batch_matches_encode(tok: Tokenizer):
    texts = CORPUS[:4] + [HARD_TEXT, ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts


def test_custom_special_tokens_and_roles():
    t = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=["<s>", "</s>", "<pad>", "<mask>"])
    assert (t.bos_id, t.eos_id, t.pad_id, t.mask_id) == (0, 1, 2, 3)
    t2 = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=["<a>", "<b>"], eos_token="<b>")
    assert t2.eos_id == 1 and t2.bos_id is None and t2.pad_id is None


def test_train_errors():
    with pytest.raises(ConfigError, match="vocab_size 100 is too small"):
        Tokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(DataError, match="empty"):
        Tokenizer.train(["", ""], vocab_size=300)
    with pytest.raises(DataError, match="not in the tokenizer's vocabulary"):
        Tokenizer.train(CORPUS, vocab_size=300, eos_token="<nope>")


_TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    from lmforge.core.tokenizer import Tokenizer
    corpus = [f"line {i}: the {'cat' if i % 3 else 'dog'} ate {i * 7} fish and {i % 5} birds." for i in range(300)]
    Tokenizer.train(corpus, vocab_size=350).save(sys.argv[1])
""")


def test_training_is_deterministic_across_processes(tmp_path: Path):
    outs = []
    for k in range(2):
        out = tmp_path / f"t{k}"
        subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, str(out)], check=True,
                       cwd=Path(__file__).resolve().parents[2])
        outs.append((out / "tokenizer.json").read_bytes())
    assert outs[0] == outs[1]
    assert Tokenizer.load(tmp_path / "t0").fingerprint == Tokenizer.load(tmp_path / "t1").fingerprint


def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path):
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    try:
        tok.save(tmp_path, model_max_length=512)
    finally:
        tok.chat_template = None
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["bos_token"] == cfg["eos_token"] == "<|endoftext|>" and cfg["pad_token"] == "<|pad|>"
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False
    assert cfg["model_max_length"] == 512 and "chat_template" in cfg
    back = Tokenizer.load(tmp_path)
    assert back.fingerprint == tok.fingerprint
    assert back.encode(HARD_TEXT) == tok.encode(HARD_TEXT)
    assert (back.bos_id, back.eos_id, back.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert back.model_max_length == 512 and back.chat_template.startswith("{% for")
    # the tokenizer.json file itself also loads
    assert Tokenizer.load(tmp_path / "tokenizer.json").fingerprint == tok.fingerprint
    # saving again gives the same bytes
    back.save(tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()


def test_fingerprint_differs_for_different_tokenizers(tok: Tokenizer):
    other = Tokenizer.train(CORPUS, vocab_size=300)
    assert len(tok.fingerprint) == 64 and tok.fingerprint != other.fingerprint


def test_config_dict_tokens(tok: Tokenizer, tmp_path: Path):
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["pad_token"] = {"content": "<|pad|>", "lstrip": False, "rstrip": False, "special": True}
    cfg["eos_token"] = {"content": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    back = Tokenizer.load(tmp_path)
    assert back.pad_token == "<|pad|>" and back.eos_id == 0


def test_autotokenizer_parity(tok: Tokenizer, tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    try:
        tok.save(tmp_path)
    finally:
        tok.chat_template = None
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = [HARD_TEXT, CORPUS[0], CORPUS[2], " leading space", ""]
    for t in texts:
        assert hf.encode(t) == tok.encode(t), t
        assert hf(t)["input_ids"] == tok.encode(t)
        ids = tok.encode(t)
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    out = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert out == "<user>hi"


def _byte_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    return {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def test_loads_transformers_gpt2_tokenizer(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    vocab = _byte_vocab()
    vocab["<|endoftext|>"] = len(vocab)
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    hf = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    hf.save_pretrained(str(tmp_path))
    t = Tokenizer.load(tmp_path)
    assert t.eos_token == t.bos_token == "<|endoftext|>" and t.eos_id == 256
    assert t.model_max_length is None  # transformers' "no limit" sentinel is dropped
    for text in ["hello world", HARD_TEXT]:
        assert t.encode(text) == hf.encode(text)
        assert t.decode(t.encode(text)) == hf.decode(hf.encode(text))
    assert t.vocab_size == len(hf)


def test_loads_transformers_llama_tokenizer(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in "▁helowrd":
        vocab.setdefault(c, len(vocab))
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    hf = transformers.LlamaTokenizerFast(vocab=vocab, merges=merges)
    hf.save_pretrained(str(tmp_path))
    t = Tokenizer.load(tmp_path)
    assert (t.bos_token, t.eos_token, t.unk_token) == ("<s>", "</s>", "<unk>")
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, None)
    assert t.encode("hello world") == hf.encode("hello world")
    assert t.decode(t.encode("hello world")) == hf.decode(hf.encode("hello world"))


def test_tokenizer_json_that_adds_bos(tmp_path: Path):
    """add_special_tokens=True means "whatever tokenizer.json's post-processor does"."""
    from tokenizers import Tokenizer as HF
    from tokenizers import processors

    base = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=["<s>", "</s>"])
    hf = HF.from_str(base.hf.to_str())
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    (tmp_path / "tokenizer.json").write_text(hf.to_str())
    t = Tokenizer.load(tmp_path)
    assert t.bos_id == 0 and t.eos_id == 1
    assert t.encode("the cat")[0] == 0
    assert t.encode("the cat", add_special_tokens=False) == t.encode("the cat")[1:]
    assert t.encode_batch(["the cat"])[0][0] == 0
    assert t.adds_bos


def test_load_errors(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(DataError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer.json") as e:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(e.value)
    bad.write_text("not json at all")
    with pytest.raises(DataError, match="is not a Hugging Face tokenizer.json"):
        Tokenizer.load(bad)


def test_load_bad_config(tok: Tokenizer, tmp_path: Path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(DataError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match="eos_token '<\\|nope\\|>' is not in the tokenizer's vocabulary"):
        Tokenizer.load(tmp_path)


def test_train_tokenizer_from_source(tmp_path: Path):
    from lmforge.data.shards import train_tokenizer

    data = tmp_path / "docs.jsonl"
    with open(data, "w") as f:
        for line in CORPUS:
            f.write(json.dumps({"text": line}) + "\n")
    out = tmp_path / "tok"
    t = train_tokenizer(str(data), 320, out)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert Tokenizer.load(out).fingerprint == t.fingerprint and 258 < t.vocab_size <= 320
    small = train_tokenizer(str(data), 320, tmp_path / "tok2", max_bytes=100)
    assert small.fingerprint != t.fingerprint
    with pytest.raises(ConfigError, match="max_bytes"):
        train_tokenizer(str(data), 320, tmp_path / "tok3", max_bytes=0)


def test_word_prefix_follows_the_pre_tokenizer(tok: Tokenizer):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    assert tok.word_prefix == " "  # byte-level BPE without add_prefix_space: "a" and " a" differ
    prefixed = HFTokenizer.from_str(tok.to_json_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert Tokenizer(prefixed).word_prefix == ""
    sp = HFTokenizer(models.WordLevel({"▁a": 0, "▁": 1, "[UNK]": 2}, unk_token="[UNK]"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    assert Tokenizer(sp).word_prefix == ""  # SentencePiece-style: the first word is already marked
