"""PackedWindows: window layout, determinism, epoch crossing, exact resume, validation order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.core.errors import ConfigError, DataError, RunError
from lmforge.data.loader import PackedWindows


def _stream(n: int = 1001) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)  # token value = position, so windows are easy to check


def test_windows_layout_and_targets():
    seq = 10
    pw = PackedWindows(_stream(), seq, seed=0)
    assert pw.num_windows == 100 and len(pw) == 100 and pw.tokens_per_epoch == 1000
    b = pw.next_batch(100)
    x, y = b["input_ids"], b["labels"]
    assert x.shape == y.shape == (100, seq) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # labels are inputs shifted by one
    assert (x[:, 0] % seq == 0).all()  # windows start at multiples of seq_len
    # one epoch: every token after the first is a target exactly once
    assert sorted(y.flatten().tolist()) == list(range(1, 1001))
    assert sorted(x[:, 0].tolist()) != x[:, 0].tolist()  # shuffled
    assert pw.state_dict()["epoch"] == 1 and pw.state_dict()["index"] == 0


def test_memmap_input(tmp_path):
    f = tmp_path / "t.bin"
    _stream(501).tofile(f)
    mm = np.memmap(f, dtype=np.uint16, mode="r")
    a = PackedWindows(mm, 8, seed=3).next_batch(16)
    b = PackedWindows(_stream(501), 8, seed=3).next_batch(16)
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_deterministic_and_seed_dependent():
    a = [PackedWindows(_stream(), 10, seed=1).next_batch(8)["input_ids"] for _ in range(2)]
    c = PackedWindows(_stream(), 10, seed=2).next_batch(8)["input_ids"]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], c)


def test_epoch_crossing_and_new_permutation():
    seq = 10
    pw = PackedWindows(_stream(), seq, seed=5)
    firsts = [pw.next_batch(30)["input_ids"][:, 0] for _ in range(7)]  # 210 windows = 2.1 epochs
    starts = torch.cat(firsts)
    e0, e1 = starts[:100], starts[100:200]
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(0, 1000, 10))
    assert not torch.equal(e0, e1)  # a new order each epoch
    assert pw.state_dict() == {"epoch": 2, "index": 10, "seed": 5, "seq_len": 10, "num_windows": 100}
    # the permutation of an epoch depends only on (seed, epoch)
    direct = np.random.Generator(np.random.PCG64([5, 1])).permutation(100) * seq
    assert e1.tolist() == direct.tolist()
    # a batch bigger than an epoch wraps too
    big = PackedWindows(_stream(101), 10, seed=0).next_batch(25)["input_ids"]
    assert big.shape == (25, 10)


def test_resume_exact():
    pw = PackedWindows(_stream(), 10, seed=7)
    for _ in range(7):
        pw.next_batch(9)
    sd = pw.state_dict()
    after = [pw.next_batch(9) for _ in range(5)]
    fresh = PackedWindows(_stream(), 10, seed=7)
    fresh.load_state_dict(dict(sd))
    again = [fresh.next_batch(9) for _ in range(5)]
    for a, b in zip(after, again):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_resume_adopts_saved_seed_and_checks_shape():
    pw = PackedWindows(_stream(), 10, seed=7)
    pw.next_batch(3)
    sd = pw.state_dict()
    other_seed = PackedWindows(_stream(), 10, seed=99)
    other_seed.load_state_dict(sd)
    assert torch.equal(other_seed.next_batch(4)["input_ids"], pw.next_batch(4)["input_ids"])
    with pytest.raises(RunError, match="seq_len 10"):
        PackedWindows(_stream(), 20, seed=7).load_state_dict(sd)
    with pytest.raises(RunError, match="100 windows"):
        PackedWindows(_stream(2001), 10, seed=7).load_state_dict(sd)
    with pytest.raises(RunError, match="lacks 'index'"):
        PackedWindows(_stream(), 10, seed=7).load_state_dict({"epoch": 0})


def test_no_shuffle_and_val_batches():
    pw = PackedWindows(_stream(), 10, seed=0, shuffle=False)
    assert pw.next_batch(3)["input_ids"][:, 0].tolist() == [0, 10, 20]
    batches = list(pw.val_batches(32))
    assert [b["input_ids"].shape[0] for b in batches] == [32, 32, 32, 4]
    starts = torch.cat([b["input_ids"][:, 0] for b in batches]).tolist()
    assert starts == list(range(0, 1000, 10))
    assert pw.num_val_batches(32) == 4 and pw.num_val_batches(32, 2) == 2
    assert len(list(pw.val_batches(32, max_batches=2))) == 2
    # val iteration does not move the training position
    assert pw.state_dict()["index"] == 3
    shuffled = PackedWindows(_stream(), 10, seed=1)
    assert [b["input_ids"][:, 0].tolist() for b in shuffled.val_batches(50)][0] == list(range(0, 500, 10))


def test_list_of_shards():
    a, b = np.arange(0, 51, dtype=np.uint16), np.arange(1000, 1031, dtype=np.uint16)
    pw = PackedWindows([a, b], 10, seed=0, shuffle=False)
    assert pw.num_windows == 5 + 3
    starts = pw.next_batch(8)["input_ids"][:, 0].tolist()
    assert starts == [0, 10, 20, 30, 40, 1000, 1010, 1020]
    sh = PackedWindows([a, b], 10, seed=4)
    x = torch.cat([sh.next_batch(3)["input_ids"] for _ in range(3)])[:8]  # windows never straddle shards
    assert sorted(x[:, 0].tolist()) == starts and ((x[:, -1] - x[:, 0]) == 9).all()


def test_errors():
    with pytest.raises(DataError, match="too few for one window"):
        PackedWindows(_stream(10), 10, seed=0)
    with pytest.raises(ConfigError):
        PackedWindows(_stream(), 0, seed=0)
    with pytest.raises(ConfigError):
        PackedWindows(_stream(), 10, seed=0).next_batch(0)


def test_with_shards(tmp_path):
    """End to end: shards -> windows; train and val windows come from disjoint documents."""
    import json

    from lmforge.core.tokenizer import Tokenizer
    from lmforge.data.shards import build_shards

    docs = [f"document number {i} says {'yes' if i % 2 else 'no'} {i * 3}" for i in range(300)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = Tokenizer.train(docs, vocab_size=300)
    s = build_shards(f, tok, cache_dir=tmp_path / "c", val_fraction=0.1)
    train = PackedWindows(s.tokens("train"), 16, seed=0)
    val = PackedWindows(s.tokens("val"), 16, seed=0, shuffle=False)
    b = train.next_batch(4)
    assert b["input_ids"].max() < tok.vocab_size
    n_val_targets = sum(int(v["labels"].numel()) for v in val.val_batches(8))
    assert n_val_targets == val.tokens_per_epoch
