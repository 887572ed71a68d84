"""BERT: the encoder model, MLM(+NSP) masking and batches checked against their definitions, the
objective's normalisation, resume, errors, pseudo-perplexity and a tiny training run."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError, DataError, RunError
from lmforge.core.tokenizer import Tokenizer
from lmforge.data.world import World, generate_documents
from lmforge.eval.fill_mask import fill_mask
from lmforge.eval.pretrain_eval import evaluate_mlm
from lmforge.eval.pseudo_perplexity import pseudo_perplexity
from lmforge.models.encoder import EncoderLM
from lmforge.models.encoder_config import EncoderConfig
from lmforge.objectives.mlm import MLMBatchSource, MLMConfig, MLMObjective, MLMVocab, collate_texts, mask_tokens

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def docs():
    return list(generate_documents(World.build(0, "small"), 0, target_bytes=150_000))


@pytest.fixture(scope="module")
def tok(docs):
    return Tokenizer.train(docs, 512, special_tokens=BERT_SPECIALS)


@pytest.fixture(scope="module")
def stream(tok, docs):
    """Token stream with [SEP] after every document (as shards write it) and the document offsets."""
    ids = tok.encode_batch(docs)
    tokens = np.concatenate([np.array(x + [tok.sep_id]) for x in ids]).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(x) + 1 for x in ids])]).astype(np.int64)
    return tokens, offsets


def tiny_config(vocab: int, **kw) -> EncoderConfig:
    base = dict(vocab_size=vocab, d_model=32, n_layer=2, n_head=4, d_ff=64, max_seq_len=64, pad_token_id=0)
    return EncoderConfig(**{**base, **kw})


def synthetic(n_docs: int = 300, seed: int = 0, n_short: int = 0):
    """Documents of unique token ids (id = 5 + position in the stream), SEP (3) after each: any span's
    origin is readable from its ids.  Returns tokens, offsets, vocab, id -> document table."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, 90, size=n_docs)
    lens[:n_short] = 1  # one-token documents: no room for a pair
    parts, offsets, doc_of, nxt = [], [0], [], 5
    for d, n in enumerate(lens):
        parts.append(np.arange(nxt, nxt + n))
        parts.append(np.array([3]))
        doc_of += [d] * int(n)
        nxt += int(n)
        offsets.append(offsets[-1] + int(n) + 1)
    tokens = np.concatenate(parts).astype(np.int64)
    vocab = MLMVocab.build(cls_id=2, sep_id=3, mask_id=4, pad_id=0, special_ids=[0, 1, 2, 3, 4], vocab_size=nxt)
    return tokens, np.array(offsets), vocab, np.array([-1] * 5 + doc_of)


def originals(batch) -> torch.Tensor:
    """The unmasked inputs: labels where a target was selected, else the inputs."""
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


# ---------------------------------------------------------------------------------------------- masking
def test_masking_80_10_10_and_selection_rate(tok):
    vocab = MLMVocab.from_tokenizer(tok)
    g = torch.Generator().manual_seed(0)
    B, T = 2000, 512
    ids = vocab.random_ids[torch.randint(len(vocab.random_ids), (B, T), generator=g)]
    specials = torch.rand(B, T, generator=g) < 0.1  # sprinkle special tokens that must never be picked
    ids = torch.where(specials, torch.tensor(vocab.special_ids)[torch.randint(5, (B, T), generator=g)], ids)
    maskable = ~vocab.is_special(ids)
    out, labels = mask_tokens(ids, maskable, vocab, MLMConfig(), g)
    sel = labels != -100
    n = int(sel.sum())
    assert n >= 100_000
    assert not sel[~maskable].any() and torch.equal(out[~maskable], ids[~maskable])  # specials untouched
    assert torch.equal(labels[sel], ids[sel]) and torch.equal(out[~sel], ids[~sel])
    # Per row exactly floor(0.15 n + u) (>= 1) targets.
    k, m = sel.sum(1), maskable.sum(1)
    assert ((k - torch.floor(0.15 * m)).abs() <= 1).all()
    assert abs(n / int(maskable.sum()) - 0.15) < 5 * math.sqrt(0.15 * 0.85 / int(maskable.sum())) + 1e-3
    is_mask = out[sel] == vocab.mask_id
    same = out[sel] == ids[sel]
    rand = ~is_mask & ~same
    K = len(vocab.random_ids)
    expect = {"mask": 0.8, "same": 0.1 + 0.1 / K, "random": 0.1 * (1 - 1 / K)}
    for name, hits in (("mask", is_mask), ("same", same), ("random", rand)):
        p = expect[name]
        assert abs(float(hits.float().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n), name
    assert not vocab.is_special(out[sel][rand]).any()  # random replacements come from the non-special vocab


def test_special_and_padding_never_selected(tok, stream):
    tokens, offsets = stream
    vocab = MLMVocab.from_tokenizer(tok)
    for nsp in (True, False):
        src = MLMBatchSource(tokens, offsets, 48, vocab, MLMConfig(nsp=nsp), seed=3)
        for _ in range(5):
            b = src.next_batch(64)
            orig = originals(b)
            sel = b["labels"] != -100
            assert not sel[vocab.is_special(orig)].any()
            assert (orig[:, 0] == tok.cls_id).all() and (sel.sum(1) >= 1).all()
            if nsp:
                assert not sel[b["attention_mask"] == 0].any()
                assert (orig[b["attention_mask"] == 0] == vocab.pad_id).all()
            else:
                assert "attention_mask" not in b and (orig[:, -1] == tok.sep_id).all()


# ---------------------------------------------------------------------------------------------- NSP
def test_nsp_pairs_against_definition():
    tokens, offsets, vocab, doc_of = synthetic()
    T = 40
    src = MLMBatchSource(tokens, offsets, T, vocab, MLMConfig(short_seq_prob=0.2), seed=0)
    labels, lengths = [], []
    for _ in range(10):
        b = src.next_batch(400)
        orig = originals(b)
        for r in range(orig.shape[0]):
            row, types, n_real = orig[r].tolist(), b["token_type_ids"][r].tolist(), int(b["attention_mask"][r].sum())
            seps = [i for i, t in enumerate(row[:n_real]) if t == vocab.sep_id]
            assert row[0] == vocab.cls_id and len(seps) == 2 and seps[1] == n_real - 1, row
            a, bb = row[1:seps[0]], row[seps[0] + 1:seps[1]]
            assert len(a) >= 1 and len(bb) >= 1 and n_real <= T
            assert types == [0] * (seps[0] + 1) + [1] * (n_real - seps[0] - 1) + [0] * (T - n_real)
            assert np.all(np.diff(a) == 1) and np.all(np.diff(bb) == 1)  # contiguous spans
            assert len(set(doc_of[a])) == 1 and len(set(doc_of[bb])) == 1
            if int(b["next_sentence_label"][r]) == 0:
                assert bb[0] == a[-1] + 1 and doc_of[a[0]] == doc_of[bb[0]]  # the true continuation
            else:
                assert doc_of[a[0]] != doc_of[bb[0]]  # another document
            labels.append(int(b["next_sentence_label"][r]))
            lengths.append(n_real)
    n = len(labels)
    assert abs(np.mean(labels) - 0.5) < 5 * math.sqrt(0.25 / n)
    assert np.mean(np.array(lengths) < T // 2) > 0.05  # short sequences occur


def test_short_documents_skipped_and_counted():
    tokens, offsets, vocab, _ = synthetic(n_short=10)
    src = MLMBatchSource(tokens, offsets, 32, vocab, MLMConfig(), seed=0)
    assert src.stats["documents_skipped"] == 10 and src.stats["documents"] == 300
    with pytest.raises(DataError, match="at least 2 documents"):
        one = np.array([7, 3, 8, 3, 9, 9, 3])
        MLMBatchSource(one, np.array([0, 2, 4, 7]), 32, vocab, MLMConfig())


# ---------------------------------------------------------------------------------------------- dynamic masking, resume
def test_dynamic_masking_differs_across_epochs(tok, stream):
    tokens, offsets = stream
    src = MLMBatchSource(tokens, offsets, 32, MLMVocab.from_tokenizer(tok), MLMConfig(nsp=False), seed=0,
                         shuffle=False)
    n = len(src)
    first, second = src.next_batch(n), src.next_batch(n)  # two passes over the same windows in order
    assert torch.equal(originals(first), originals(second))
    assert not torch.equal(first["labels"] != -100, second["labels"] != -100)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("nsp", [True, False])
def test_resume_exact(tok, stream, nsp):
    tokens, offsets = stream
    vocab = MLMVocab.from_tokenizer(tok)
    make = lambda: MLMBatchSource(tokens, offsets, 48, vocab, MLMConfig(nsp=nsp), seed=7)  # noqa: E731
    a = make()
    per_epoch = len(a)
    for _ in range(3):
        a.next_batch(per_epoch // 2 + 3)  # crosses an epoch boundary
    state = _roundtrip(a.state_dict())
    want = [a.next_batch(17) for _ in range(3)]
    b = make()
    b.load_state_dict(state)
    for w in want:
        got = b.next_batch(17)
        assert got.keys() == w.keys() and all(torch.equal(got[k], w[k]) for k in w)
    c = make()
    assert not torch.equal(c.next_batch(17)["input_ids"], want[0]["input_ids"])
    bad = dict(state, seq_len=64)
    with pytest.raises(RunError, match="seq_len"):
        make().load_state_dict(bad)


def test_val_batches_fixed_and_independent(tok, stream):
    tokens, offsets = stream
    src = MLMBatchSource(tokens, offsets, 48, MLMVocab.from_tokenizer(tok), MLMConfig(), seed=1)
    before = src.state_dict()
    v1 = list(src.val_batches(16, 3))
    v2 = list(src.val_batches(16, 3))
    assert len(v1) == 3 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(v1, v2))
    after = src.state_dict()
    assert before["position"] == after["position"] and torch.equal(before["generator"], after["generator"])


# ---------------------------------------------------------------------------------------------- errors and configs
def test_bad_input_errors(docs, tok):
    gpt_tok = Tokenizer.train(docs[:50], 300)  # default specials: no [MASK]/[CLS]/[SEP]
    with pytest.raises(DataError, match=r"\[MASK\]") as e:
        MLMVocab.from_tokenizer(gpt_tok)
    assert "\n" not in str(e.value)
    vocab = MLMVocab.from_tokenizer(tok)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(DataError, match="text 1 has no token that can be masked"):
        collate_texts([[40, 41], [tok.sep_id, tok.mask_id]], vocab, MLMConfig(), g)
    with pytest.raises(DataError, match="text 0"):
        collate_texts([[]], vocab, MLMConfig(), g)
    ok = MLMObjective(vocab).collate([[40, 41, 42], [50]])
    assert ok["input_ids"].shape == (2, 5) and ((ok["labels"] != -100).sum(1) == 1).all()
    assert ok["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    tokens, offsets, svocab, _ = synthetic()
    with pytest.raises(ConfigError, match="seq_len 4"):
        MLMBatchSource(tokens, offsets, 4, svocab, MLMConfig())
    with pytest.raises(ConfigError, match="mask_token_ratio"):
        MLMConfig(mask_token_ratio=0.95, random_token_ratio=0.1)
    with pytest.raises(ConfigError, match="mask_prob"):
        MLMConfig(mask_prob=0.0)


def test_configs_from_dict():
    cfg = from_dict(EncoderConfig, {"family": "bert", "d_model": 64, "n_head": 2, "dropout": 0.0})
    assert cfg.ffn_dim == 256 and cfg.family == "bert"
    assert from_dict(MLMConfig, {"nsp": False, "mask_prob": 0.2}) == MLMConfig(mask_prob=0.2, nsp=False)
    with pytest.raises(ConfigError, match="family"):
        from_dict(EncoderConfig, {"family": "gpt2"})


# ---------------------------------------------------------------------------------------------- model
def test_meta_build_equals_eager_bitwise():
    for tie in (True, False):
        cfg = tiny_config(100, tie_embeddings=tie)
        torch.manual_seed(0)
        eager = EncoderLM(cfg)
        with torch.device("meta"):
            meta = EncoderLM(cfg)
        assert all(p.is_meta for p in meta.parameters())
        meta.to_empty(device="cpu")
        torch.manual_seed(0)
        meta.reset_parameters()
        a, b = eager.state_dict(), meta.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (meta.predictions.decoder.weight is meta.embeddings.word_embeddings.weight) == tie
        assert (eager.embeddings.word_embeddings.weight[0] == 0).all()  # padding row
        assert (eager.predictions.decoder.bias == 0).all() and (eager.blocks[0].output.LayerNorm.weight == 1).all()
        std = eager.blocks[1].intermediate.dense.weight.std().item()
        assert 0.015 < std < 0.025


def test_hf_module_names_present():
    names = dict(EncoderLM(tiny_config(50)).named_modules())
    for leaf in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
        assert f"blocks.1.{leaf}" in names
    for path in ("pooler.dense", "predictions.transform.dense", "predictions.transform.LayerNorm",
                 "predictions.decoder", "seq_relationship", "embeddings.token_type_embeddings"):
        assert path in names
    assert all(isinstance(names[f"blocks.0.{p}"], torch.nn.Linear) for p in ("attention.self.query", "output.dense"))


def test_padding_heads_and_checkpointing():
    torch.manual_seed(0)
    model = EncoderLM(tiny_config(60, dropout=0.0, attention_dropout=0.0))
    ids = torch.randint(5, 60, (2, 9))
    types = torch.tensor([[0] * 4 + [1] * 5] * 2)
    ref = model(ids, token_type_ids=types)
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 9), torch.zeros(2, 4)], 1).long()
    out = model(padded, attention_mask=mask, token_type_ids=F.pad(types, (0, 4)))
    torch.testing.assert_close(out[:, :9], ref, rtol=1e-5, atol=1e-5)
    sel = torch.rand(2, 9) < 0.4
    torch.testing.assert_close(model.mlm_logits(ref, sel), model.mlm_logits(ref)[sel])
    assert model.nsp_logits(model.pooled(ref)).shape == (2, 2)
    # Activation checkpointing: same loss and gradients.
    model.train()
    grads = []
    for ckpt in (False, True):
        model.set_activation_checkpointing(ckpt)
        model.zero_grad()
        h = model(padded, attention_mask=mask)
        (model.mlm_logits(h).square().mean() + model.nsp_logits(model.pooled(h)).square().mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- objective
def test_loss_is_mean_mlm_plus_mean_nsp_for_any_split(tok, stream):
    tokens, offsets = stream
    src = MLMBatchSource(tokens, offsets, 48, MLMVocab.from_tokenizer(tok), MLMConfig(), seed=0)
    batch = src.next_batch(12)
    torch.manual_seed(0)
    model = EncoderLM(tiny_config(tok.vocab_size, max_seq_len=48, dropout=0.0, attention_dropout=0.0))
    obj = MLMObjective()
    count = obj.target_count(batch)
    whole = obj.loss(model, batch)
    assert int(whole.count) == count
    hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    mlm = F.cross_entropy(model.mlm_logits(hidden).flatten(0, 1), batch["labels"].flatten())  # HF's two means
    nsp = F.cross_entropy(model.nsp_logits(model.pooled(hidden)), batch["next_sentence_label"])
    torch.testing.assert_close(whole.loss_sum / count, mlm + nsp)
    parts = [obj.loss(model, {k: v[i:i + 4] for k, v in batch.items()}) for i in (0, 4, 8)]
    torch.testing.assert_close(sum(p.loss_sum for p in parts), whole.loss_sum)
    torch.testing.assert_close(sum(p.metrics["nsp_loss"] for p in parts) / count, nsp.detach())
    nsp_acc = (model.nsp_logits(model.pooled(hidden)).argmax(-1) == batch["next_sentence_label"]).float().mean()
    torch.testing.assert_close(whole.metrics["nsp_acc"] / count, nsp_acc)
    val = evaluate_mlm(model, iter([batch]))
    assert val["val_loss"] == pytest.approx(float((mlm + nsp).detach()), rel=1e-5)
    assert val["val_nsp_acc"] == pytest.approx(float(nsp_acc))


def test_tiny_training_loss_falls(tmp_path, tok, docs):
    from lmforge.data.shards import build_shards
    from lmforge.train import RunSpec, Trainer, TrainerConfig

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:400]))
    shards = build_shards(str(corpus), tok, tmp_path / "cache", val_fraction=0.05)
    src = MLMBatchSource.from_shards(shards, "train", tok, 32, MLMConfig(), seed=0)
    torch.manual_seed(0)
    model = EncoderLM(tiny_config(tok.vocab_size, max_seq_len=32, dropout=0.0, attention_dropout=0.0,
                                  pad_token_id=tok.pad_id))
    cfg = TrainerConfig(global_batch_size=32, lr=3e-3, warmup_steps=3, log_every=1, ckpt_every=0, device="cpu",
                        tensorboard=False, weight_decay=0.01)
    Trainer(model, MLMObjective(), src, cfg, RunSpec(tmp_path / "run", 40, seed=0), progress=False).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc"} <= rows[-1].keys()
    first = np.mean([r["mlm_loss"] for r in rows[:3]])
    last = np.mean([r["mlm_loss"] for r in rows[-3:]])
    # From uniform guessing (ln V) down to about the targets' unigram entropy (~5.3 nats here) in 40
    # steps; getting past that plateau takes longer runs (acceptance tests).
    assert first > math.log(tok.vocab_size) - 0.1 and last < first - 0.6, (first, last)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["mlm_loss"] + rows[-1]["nsp_loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------------- eval
def test_pseudo_perplexity_matches_direct_loop(tok):
    torch.manual_seed(0)
    model = EncoderLM(tiny_config(tok.vocab_size, pad_token_id=tok.pad_id)).eval()
    texts = ["Mira lives in Lomere.", "The spoon costs five coins and the bucket costs nine.", "Yes"]
    got = pseudo_perplexity(model, tok, texts, max_length=12, batch_size=5)
    nll, n = 0.0, 0
    rows = []  # a text longer than max_length - 2 = 10 tokens is scored in windows of 10, not cut
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        rows += [[tok.cls_id, *ids[s:s + 10], tok.sep_id] for s in range(0, len(ids), 10)]
    assert len(rows) > len(texts)  # the second text does not fit one window
    with torch.no_grad():
        for row in rows:
            for j in range(1, len(row) - 1):
                x = torch.tensor([row])
                x[0, j] = tok.mask_id
                logp = model.mlm_logits(model(x))[0, j].log_softmax(-1)
                nll -= float(logp[row[j]])
                n += 1
    assert got["tokens"] == n
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["pseudo_perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    with pytest.raises(DataError, match="text 1"):
        pseudo_perplexity(model, tok, ["fine", ""], max_length=12)


def test_fill_mask(tok):
    torch.manual_seed(0)
    model = EncoderLM(tiny_config(tok.vocab_size)).eval()
    out = fill_mask(model, tok, "The [MASK] costs five [MASK].", top_k=3)
    assert len(out) == 2 and all(len(o) == 3 for o in out)
    assert all(o[0][1] >= o[1][1] >= o[2][1] > 0 for o in out)
    with pytest.raises(DataError, match="no"):
        fill_mask(model, tok, "no mask here")
