"""Span corruption against a straightforward implementation of the T5 reference algorithm (``random_spans_noise_mask``,
sentinel replacement, the ``random_spans_helper`` length search), the batch source, sentinel tokenizers, the
seq2seq objective, and a tiny Trainer run whose span-corruption loss falls."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.tokenizer import Tokenizer
from lmforge.data.span import add_sentinels, check_sentinels, train_t5_tokenizer
from lmforge.eval.pretrain_eval import evaluate_span
from lmforge.objectives.seq2seq import Seq2SeqObjective
from lmforge.objectives.span import (SpanConfig, SpanCorruptionSource, compute_input_and_target_lengths, corrupt_spans,
                                     plan_spans, random_spans_noise_mask)

VOCAB = 1000
EOS = 1


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the reference, written out plainly -----------------------------------------------------------------

def ref_noise_mask(length: int, density: float, mean: float, u: np.ndarray) -> list[bool]:
    """T5's random_spans_noise_mask, one window, loops only.  ``u`` (``length - 2`` uniforms) drives the two
    shuffles: the first ``noise - 1`` for the noise split, the rest for the non-noise split."""
    num_noise = min(max(int(round(length * density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean)), 1)
    num_clean = length - num_noise

    def segmentation(num_items: int, num_segments: int, uu: np.ndarray) -> list[int]:
        ones = [1 if j < num_segments - 1 else 0 for j in range(num_items - 1)]
        order = sorted(range(num_items - 1), key=lambda j: (uu[j], j))  # a uniformly random permutation
        first_in_segment = [0] + [ones[order[j]] for j in range(num_items - 1)]  # the shuffled indicator
        segment_id = list(itertools.accumulate(first_in_segment))
        return [segment_id.count(s) for s in range(num_segments)]

    noise_lengths = segmentation(num_noise, num_spans, u[:num_noise - 1])
    clean_lengths = segmentation(num_clean, num_spans, u[num_noise - 1:])
    mask: list[bool] = []
    for c, n in zip(clean_lengths, noise_lengths):  # interleaved, non-noise first
        mask += [False] * c + [True] * n
    return mask


def ref_corrupt(tokens: list[int], mask: list[bool], vocab: int, eos: int) -> tuple[list[int], list[int]]:
    def collapse(drop: list[bool]) -> list[int]:
        out, k = [], 0
        for i, t in enumerate(tokens):
            if drop[i] and (i == 0 or not drop[i - 1]):
                out.append(vocab - 1 - k)  # one sentinel per dropped span, numbered in order
                k += 1
            elif not drop[i]:
                out.append(t)
        return out + [eos]

    return collapse(mask), collapse([not m for m in mask])


def ref_lengths(inputs_length: int, density: float, mean: float) -> tuple[int, int]:
    """random_spans_helper: the longest window whose inputs fit."""
    def lengths(n: int) -> tuple[int, int]:
        noise = int(round(n * density))
        spans = int(round(noise / mean))
        return n - noise + spans + 1, noise + spans + 1

    n = inputs_length - 1
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    inputs, targets = lengths(n)
    if density == 0.5 and targets > inputs_length:
        n, targets = n - 1, targets - 1
    return n, targets


# ---- the algorithm --------------------------------------------------------------------------------------

def test_noise_mask_and_corruption_equal_the_reference_on_random_lengths():
    rnd = random.Random(0)
    checked = 0
    for trial in range(300):
        length = rnd.randint(2, 700)
        density, mean = rnd.choice([(0.15, 3.0), (0.15, 3.0), (0.3, 1.0), (0.5, 3.0), (0.15, 5.5)])
        rows = 3
        tokens = np.random.default_rng(trial).integers(3, 500, (rows, length))
        mask = random_spans_noise_mask(rows, length, density, mean, np.random.default_rng(trial))
        inputs, targets = corrupt_spans(tokens, mask, VOCAB, EOS)
        ref_rng = np.random.default_rng(trial)  # the same stream, consumed row by row
        for r in range(rows):
            ref_mask = ref_noise_mask(length, density, mean, ref_rng.random(length - 2))
            assert mask[r].tolist() == ref_mask, (length, density, mean)
            ref_in, ref_tg = ref_corrupt(tokens[r].tolist(), ref_mask, VOCAB, EOS)
            assert inputs[r].tolist() == ref_in and targets[r].tolist() == ref_tg
        checked += 1
    assert checked == 300


def test_span_structure_sentinel_ids_and_order():
    length, rows = 568, 50
    tokens = np.random.default_rng(1).integers(3, 500, (rows, length))
    mask = random_spans_noise_mask(rows, length, 0.15, 3.0, np.random.default_rng(2))
    inputs, targets = corrupt_spans(tokens, mask, VOCAB, EOS)
    assert (mask.sum(1) == round(568 * 0.15)).all()  # 85 noise tokens
    for r in range(rows):
        m = mask[r]
        starts = np.flatnonzero(m & ~np.r_[False, m[:-1]])
        assert len(starts) == 28 and not m[0] and m[-1]  # round(85 / 3) spans; begins clean, ends noisy
        sent_in = [t for t in inputs[r] if t >= VOCAB - 28]
        sent_tg = [t for t in targets[r] if t >= VOCAB - 28]
        assert sent_in == sent_tg == [VOCAB - 1 - i for i in range(28)]  # <extra_id_0>, <extra_id_1>, ... in order
        assert targets[r][0] == VOCAB - 1 and inputs[r][-1] == EOS and targets[r][-1] == EOS
        # Putting the spans back gives the window again.
        spans, cur = {}, None
        for t in targets[r][:-1]:
            if t >= VOCAB - 28:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        restored = [x for t in inputs[r][:-1] for x in (spans[t] if t >= VOCAB - 28 else [t])]
        assert restored == tokens[r].tolist()
    lengths = [len(s) for s in np.split(np.arange(length), np.flatnonzero(np.diff(mask[0].astype(int))) + 1)]
    assert min(lengths) >= 1


def test_noise_statistics():
    mask = random_spans_noise_mask(400, 568, 0.15, 3.0, np.random.default_rng(3))
    starts = (mask & ~np.c_[np.zeros((400, 1), bool), mask[:, :-1]]).sum()
    assert abs(mask.mean() - 0.15) < 0.001 and abs(mask.sum() / starts - 85 / 28) < 1e-9
    # A uniformly random split of 85 noise tokens into 28 non-empty spans puts one token in a given span with
    # probability C(83, 26) / C(84, 27) = 27 / 84.
    ones = 0
    for row in mask:
        edges = np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))
        ones += int((edges[1::2] - edges[0::2] == 1).sum())
    assert abs(ones / (400 * 28) - 27 / 84) < 0.02


def test_length_arithmetic_equals_the_reference():
    rnd = random.Random(1)
    for inputs_length in list(range(2, 300)) + [rnd.randint(300, 5000) for _ in range(200)]:
        for density, mean in ((0.15, 3.0), (0.3, 3.0), (0.5, 3.0), (0.15, 8.0), (0.1, 2.0)):
            assert compute_input_and_target_lengths(inputs_length, density, mean) == \
                ref_lengths(inputs_length, density, mean)
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)  # T5's published setting


def test_corrupted_windows_have_exactly_the_planned_lengths():
    rnd = random.Random(2)
    for _ in range(100):
        cfg = SpanConfig(rnd.choice([0.15, 0.3]), rnd.choice([3.0, 2.0]), rnd.randint(12, 900))
        try:
            plan = plan_spans(cfg)
        except ConfigError:
            continue
        rng = np.random.default_rng(0)
        tokens = rng.integers(3, 500, (2, plan.tokens_length))
        mask = random_spans_noise_mask(2, plan.tokens_length, cfg.noise_density, cfg.mean_noise_span_length, rng)
        inputs, targets = corrupt_spans(tokens, mask, VOCAB, EOS)
        assert inputs.shape[1] == cfg.inputs_length and targets.shape[1] == plan.targets_length


def test_unservable_inputs_length_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"inputs_length=5 .*use span.inputs_length=10") as e:
        plan_spans(SpanConfig(inputs_length=5))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError):  # via YAML: bad density
        from lmforge.core.config import from_dict
        from_dict(SpanConfig, {"noise_density": 1.5})


# ---- the batch source ----------------------------------------------------------------------------------

def stream(n: int = 20000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 500, n).astype(np.uint16)


def test_source_batches_resume_exactly_and_val_is_fixed():
    cfg = SpanConfig(inputs_length=64)
    a = SpanCorruptionSource(stream(), cfg, vocab_size=VOCAB, eos_id=EOS, seed=3)
    first = a.next_batch(4)
    assert first["input_ids"].shape == (4, 64) and first["labels"].shape == (4, plan_spans(cfg).targets_length)
    assert first["attention_mask"].all() and first["input_ids"].dtype == torch.long
    from lmforge.train.checkpoint import from_plain, to_plain
    state = from_plain(to_plain(a.state_dict()))
    expected = [a.next_batch(4) for _ in range(3)]
    b = SpanCorruptionSource(stream(), cfg, vocab_size=VOCAB, eos_id=EOS, seed=3)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch(4)
        assert all(torch.equal(got[k], want[k]) for k in want)
    v1 = list(a.val_batches(8, max_batches=2))
    v2 = list(a.val_batches(8, max_batches=2))
    assert len(v1) == 2 and all(torch.equal(x["labels"], y["labels"]) for x, y in zip(v1, v2))


def test_full_text_targets_reconstruct_the_window_and_the_rest_stay_span_targets():
    # BART-style text infilling rows: same corrupted inputs, the target is the whole raw window + EOS; the other
    # rows keep T5's span targets, padded with -100 to the same length.
    base = SpanCorruptionSource(stream(), SpanConfig(inputs_length=64), vocab_size=VOCAB, eos_id=EOS, seed=3)
    mixed = SpanCorruptionSource(stream(), SpanConfig(inputs_length=64, full_text_fraction=0.5), vocab_size=VOCAB,
                                 eos_id=EOS, seed=3)
    raw = SpanCorruptionSource._raw(mixed.windows.next_batch(64))
    plan = plan_spans(mixed.cfg)
    noise_rng, mixed_rng = np.random.default_rng(7), np.random.default_rng(7)
    want, got = base.corrupt(raw, noise_rng), mixed.corrupt(raw, mixed_rng)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert got["labels"].shape == (64, plan.tokens_length + 1)
    whole = (got["labels"][:, plan.targets_length:] != -100).any(1)
    assert 16 < int(whole.sum()) < 48  # about half, drawn per row
    assert torch.equal(got["labels"][whole, :-1], torch.from_numpy(raw)[whole])
    assert (got["labels"][whole, -1] == EOS).all()
    assert torch.equal(got["labels"][~whole, :plan.targets_length], want["labels"][~whole])
    assert (got["labels"][~whole, plan.targets_length:] == -100).all()
    with pytest.raises(ValueError, match=r"full_text_fraction=1.5 must be in \[0, 1\]"):
        SpanConfig(full_text_fraction=1.5)


def test_prefix_lm_rows_split_each_window_into_a_masked_prefix_and_its_continuation():
    # T5's prefix-LM objective: input = the window's first s tokens + EOS (padded, masked), target = the rest + EOS.
    cfg = SpanConfig(inputs_length=64, full_text_fraction=0.25, prefix_lm_fraction=0.5)
    src = SpanCorruptionSource(stream(), cfg, vocab_size=VOCAB, eos_id=EOS, seed=3)
    plan = plan_spans(cfg)
    raw = SpanCorruptionSource._raw(src.windows.next_batch(256))
    got = src.corrupt(raw, np.random.default_rng(5))
    ids, mask, labels = got["input_ids"], got["attention_mask"], got["labels"]
    assert ids.shape == (256, 64) and labels.shape == (256, plan.tokens_length + 1)
    prefix = mask[:, -1] == 0  # span and full-text rows fill every input position
    whole = ~prefix & (labels[:, plan.targets_length:] != -100).any(1)
    assert 96 < int(prefix.sum()) < 160 and 32 < int(whole.sum()) < 96  # ~1/2 and ~1/4 of the rows
    cuts = set()
    for i in torch.nonzero(prefix).flatten().tolist():
        s = int(mask[i].sum()) - 1  # prefix tokens; the EOS follows them
        cuts.add(s)
        window = torch.from_numpy(raw[i])
        assert torch.equal(ids[i, :s], window[:s]) and ids[i, s] == EOS and (ids[i, s + 1:] == 0).all()
        n = plan.tokens_length - s
        assert torch.equal(labels[i, :n], window[s:]) and labels[i, n] == EOS and (labels[i, n + 1:] == -100).all()
        assert 1 <= s <= 63
    assert len(cuts) > 20  # the cut is drawn per row
    assert (mask[~prefix] == 1).all()
    with pytest.raises(ValueError, match=r"prefix_lm_fraction=-0.1 must be in \[0, 1\]"):
        SpanConfig(prefix_lm_fraction=-0.1)
    with pytest.raises(ValueError, match=r"full_text_fraction \+ prefix_lm_fraction = 1.2 exceeds 1"):
        SpanConfig(full_text_fraction=0.6, prefix_lm_fraction=0.6)


def test_source_errors():
    with pytest.raises(DataError, match="too few for one span-corruption window"):
        SpanCorruptionSource(stream(50), SpanConfig(inputs_length=64), vocab_size=VOCAB, eos_id=EOS)
    plain = Tokenizer.train(["hello world, this is some text"] * 10, vocab_size=300)
    with pytest.raises(DataError, match=r"no sentinel <extra_id_0> at id vocab_size-1-0.*train_t5_tokenizer") as e:
        SpanCorruptionSource(stream(), SpanConfig(inputs_length=64), tokenizer=plain)
    assert "\n" not in str(e.value)


def test_t5_tokenizer_puts_sentinels_last(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 30
    tok = train_t5_tokenizer(texts, vocab_size=400, n_sentinels=20)
    V = tok.vocab_size
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, None)
    assert [tok.token_to_id(f"<extra_id_{i}>") for i in range(20)] == [V - 1 - i for i in range(20)]
    check_sentinels(tok, 20)
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.token_to_id("<extra_id_0>") == V - 1 and again.eos_id == 1
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    with pytest.raises(DataError, match="already has sentinel"):
        add_sentinels(tok, 5)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(texts), encoding="utf-8")
    from lmforge.data.shards import build_shards

    shards = build_shards(str(corpus), tok, cache_dir=tmp_path / "cache", val_fraction=0.0)
    src = SpanCorruptionSource.from_shards(shards, "train", tok, SpanConfig(inputs_length=20))
    batch = src.next_batch(2)
    assert tok.id_to_token(int(batch["labels"][0, 0])) == "<extra_id_0>"
    assert int(batch["input_ids"][0, -1]) == int(batch["labels"][0, -1]) == tok.eos_id


# ---- the objective ----------------------------------------------------------------------------------------

def tiny_t5(vocab: int = 128, **kw):
    from lmforge.models.encdec import EncoderDecoderLM
    from lmforge.models.t5_layers import T5Config

    torch.manual_seed(0)
    return EncoderDecoderLM(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, relative_attention_max_distance=32, **kw))


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_seq2seq_loss_is_summed_ce_with_the_output_scaling(ff):
    model = tiny_t5(feed_forward_proj=ff)
    obj = Seq2SeqObjective()
    batch = obj.collate([([5, 6, 7, 1], [9, 10, 1]), ([8, 1], [11, 12, 13, 14, 1])])
    assert batch["labels"][0].tolist() == [9, 10, 1, -100, -100] and batch["attention_mask"][1].tolist() == [1, 1, 0, 0]
    out = obj.loss(model, batch)
    assert int(out.count) == obj.target_count(batch) == 8
    # reference: T5ForConditionalGeneration's math -- decoder stack, rescale by d_model**-0.5 (v1.0), head
    from lmforge.models.t5_layers import padding_bias

    dec_in = model.shift_right(batch["labels"])
    T = dec_in.shape[1]
    causal = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        enc = model.encode(batch["input_ids"], batch["attention_mask"])
        h = model.decoder(model.shared(dec_in), causal, enc, padding_bias(batch["attention_mask"]))
        logits = model.lm_head(h if ff == "gated-gelu" else h * 32 ** -0.5)
    ref = F.cross_entropy(logits.reshape(-1, 128), batch["labels"].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss_sum, ref, rtol=1e-5, atol=1e-5)
    correct = (logits.argmax(-1) == batch["labels"]).sum()
    assert int(out.metrics["target_acc"]) == int(correct)


def test_span_corruption_loss_falls_with_the_trainer(tmp_path):
    from lmforge.train import Evaluation, RunSpec, Trainer, TrainerConfig

    rng = np.random.default_rng(0)
    phrases = [rng.integers(3, 60, 8) for _ in range(12)]  # a corpus of 12 recurring phrases
    tokens = np.concatenate([phrases[i] for i in rng.integers(0, 12, 1500)]).astype(np.uint16)
    source = SpanCorruptionSource(tokens[:-2000], SpanConfig(inputs_length=32), vocab_size=128, eos_id=EOS, seed=0)
    val = SpanCorruptionSource(tokens[-2000:], SpanConfig(inputs_length=32), vocab_size=128, eos_id=EOS, shuffle=False)
    cfg = TrainerConfig(global_batch_size=16, lr=3e-3, warmup_steps=5, schedule="constant", log_every=1,
                        ckpt_every=0, device="cpu", tensorboard=False, weight_decay=0.0)
    trainer = Trainer(tiny_t5(), Seq2SeqObjective(), source, cfg, RunSpec(tmp_path / "run", 100, seed=0),
                      Evaluation(lambda m: evaluate_span(m, val.val_batches(16, 4))), progress=False)
    trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    assert last["step"] == 100
    assert last["loss"] < 0.6 * first["loss"], (first["loss"], last["loss"])
    assert last["target_acc"] > first["target_acc"] + 0.2, (first["target_acc"], last["target_acc"])
    assert last["val_loss"] < 0.7 * first["loss"] and last["val_target_acc"] > 0.2, last
