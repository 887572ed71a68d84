"""Guarded outputs (lmforge.core.outputs) and the tokenizer fingerprint a model dir records: what a forced write
replaces and keeps, who owns a directory, and loading a model whose tokenizer was swapped or grew."""

import json

import pytest
import torch

from lmforge.core.errors import ConfigError, ModelError, RunError
from lmforge.core.outputs import MARKER, check_output_dir, foreign_entries, publish_dir, read_marker, write_marker
from lmforge.core.tokenizer import Tokenizer
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.io import load_model, save_model
from lmforge.models.task import ensure_pad_token
from lmforge.recipes.bench_peft import _claim_run_dir
from lmforge.train.rundir import check_run_outputs
from tests.faults import assert_unchanged, hashes

TEXTS = [f"a note {i} about {w} things" for i, w in enumerate(["red", "blue", "green", "odd"] * 20)]


def _tok(texts=TEXTS, special=("<|endoftext|>",)) -> Tokenizer:
    return Tokenizer.train(texts, vocab_size=280, special_tokens=list(special))


def _model(tok: Tokenizer) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(DecoderConfig(family="gpt2", vocab_size=tok.vocab_size, d_model=16, n_layer=1, n_head=2,
                                   max_seq_len=16, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id))


def _tmp_dir(root, name, files):
    d = root / name
    d.mkdir()
    for f, text in files.items():
        (d / f).write_text(text)
    return d


def test_publish_replaces_an_own_dir_whole_and_keeps_foreign_files(tmp_path):
    own = _tmp_dir(tmp_path, "own", {"a.txt": "old", "stale.txt": "old"})
    write_marker(own, "model", ["a.txt", "stale.txt"])
    publish_dir(_tmp_dir(tmp_path, "new1", {"a.txt": "new", MARKER: json.dumps(read_marker(own))}), own)
    assert sorted(p.name for p in own.iterdir()) == ["a.txt", MARKER]  # lmforge wrote stale.txt: replaced whole

    theirs = _tmp_dir(tmp_path, "theirs", {"a.txt": "theirs", "notes.txt": "mine"})
    publish_dir(_tmp_dir(tmp_path, "new2", {"a.txt": "new", "b.txt": "new"}), theirs)
    assert (theirs / "notes.txt").read_text() == "mine"  # never deleted
    assert (theirs / "a.txt").read_text() == "new" and (theirs / "b.txt").read_text() == "new"
    assert not (tmp_path / "new2").exists()


def test_check_output_dir_refuses_non_empty_unless_forced_or_owned(tmp_path):
    check_output_dir(tmp_path / "missing", force=False, what="--out")
    d = _tmp_dir(tmp_path, "d", {"x": "1"})
    with pytest.raises(ConfigError, match="already holds files .*x.*written by not lmforge.*--force"):
        check_output_dir(d, force=False, what="--out 'd'")
    check_output_dir(d, force=True, what="--out")
    write_marker(d, "model", ["x"])
    with pytest.raises(ConfigError, match="written by lmforge's '"):
        check_output_dir(d, force=False, what="--out")
    check_output_dir(d, force=False, what="--out", owned=lambda m: m["kind"] == "model")
    (d / MARKER).write_text("{not json")  # a torn or foreign marker owns nothing
    assert read_marker(d) is None and foreign_entries(d) == [MARKER, "x"]
    with pytest.raises(ConfigError, match="is a file"):
        check_output_dir(d / "x", force=True, what="--out")


def test_model_dir_records_its_tokenizer_and_refuses_a_swapped_one_of_the_same_size(tmp_path):
    tok = _tok()
    save_model(_model(tok), tmp_path / "m", tokenizer=tok)
    marker = read_marker(tmp_path / "m")
    assert marker["kind"] == "model" and marker["tokenizer"] == {"fingerprint": tok.fingerprint,
                                                                 "vocab_size": tok.vocab_size}
    assert set(marker["files"]) == {p.name for p in (tmp_path / "m").iterdir()}
    load_model(tmp_path / "m")  # its own tokenizer loads
    other = _tok([t.replace("a note", "one line") for t in TEXTS])
    assert other.vocab_size == tok.vocab_size and other.fingerprint != tok.fingerprint
    (tmp_path / "m" / "tokenizer.json").write_text(other.to_json_str())
    with pytest.raises(ModelError, match=r"tokenizer\.json' is not the tokenizer .*lmforge\.json' records"):
        load_model(tmp_path / "m")


def test_fingerprint_follows_added_tokens(tmp_path):
    tok = _tok()  # no pad token: a fine-tuning run adds <|pad|> (one more id, one more embedding row)
    model = _model(tok)
    before = tok.fingerprint
    ensure_pad_token(model, tok)
    save_model(model, tmp_path / "m", tokenizer=tok)
    recorded = read_marker(tmp_path / "m")["tokenizer"]
    assert recorded["fingerprint"] != before and recorded["vocab_size"] == model.config.vocab_size == 281
    _, loaded = load_model(tmp_path / "m")
    assert loaded.fingerprint == recorded["fingerprint"]


def test_hf_dir_without_marker_checks_size_only(tmp_path):
    tok = _tok()
    save_model(_model(tok), tmp_path / "m", tokenizer=tok)
    (tmp_path / "m" / MARKER).unlink()  # as transformers' save_pretrained would leave it: no lmforge marker
    small = Tokenizer.train(TEXTS, vocab_size=270, special_tokens=["<|endoftext|>"])
    (tmp_path / "m" / "tokenizer.json").write_text(small.to_json_str())
    assert load_model(tmp_path / "m")[1].vocab_size == small.vocab_size  # fewer ids than rows: fine
    big = Tokenizer.train(TEXTS * 3 + [t.upper() for t in TEXTS], vocab_size=320, special_tokens=["<|endoftext|>"])
    assert big.vocab_size > tok.vocab_size
    (tmp_path / "m" / "tokenizer.json").write_text(big.to_json_str())
    with pytest.raises(ModelError, match="embedding rows"):
        load_model(tmp_path / "m")


def test_run_outputs_of_a_dir_without_a_run(tmp_path):
    check_run_outputs(tmp_path / "new")
    run = _tmp_dir(tmp_path, "run", {".lock": ""})
    tok = _tmp_dir(run, "tokenizer", {"tokenizer.json": "{}", "tokenizer_config.json": "{}"})
    write_marker(tok, "run-tokenizer", ["tokenizer.json", "tokenizer_config.json"])
    check_run_outputs(run)  # what a start cut off before config.yaml leaves: a re-run takes it over
    (run / "model").mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=r"holds no run .*model/, notes\.txt.*overwrite=true"):
        check_run_outputs(run)
    check_run_outputs(run, overwrite=True)


def test_run_outputs_of_a_run_refuse_a_model_dir_lmforge_did_not_write(tmp_path):
    run = _tmp_dir(tmp_path, "run", {"config.yaml": "seed: 0\n", "metrics.jsonl": '{"step": 1}\n'})
    model = _tmp_dir(run, "model", {"config.json": "{}"})
    with pytest.raises(RunError, match="has a model/ that lmforge did not write"):
        check_run_outputs(run)
    write_marker(model, "model", ["config.json"])  # the run's own export: a re-export replaces it
    check_run_outputs(run)


def test_bench_removes_only_run_dirs_it_made(tmp_path):
    theirs = _tmp_dir(tmp_path, "lora-seed0", {"notes.txt": "mine"})
    before = hashes(theirs)
    with pytest.raises(ConfigError, match="holds files the bench did not write"):
        _claim_run_dir(theirs)
    assert_unchanged(before)
    mine = tmp_path / "full-seed0"
    _claim_run_dir(mine)
    (mine / "results.json").write_text("{}")  # a run cut off, or of another command: replaced
    _claim_run_dir(mine)
    assert [p.name for p in mine.iterdir()] == [MARKER] and read_marker(mine)["kind"] == "bench-run"
