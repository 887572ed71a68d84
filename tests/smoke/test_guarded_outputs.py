"""Nothing lost (issue 22, guarded outputs and tokenizer/model pairs): every command that writes a directory refuses
one it does not own, forcing never deletes what lmforge did not write, and a model dir whose tokenizer is not its own
does not load.  Each refusal: non-zero exit, one `error:` line, no traceback, every file that existed byte-identical."""

import json
import shutil

import pytest
import torch

from lmforge.core.outputs import MARKER, read_marker
from lmforge.core.tokenizer import Tokenizer
from lmforge.delta import DeltaConfig, apply_delta, save_delta
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.io import load_model, save_model
from tests.conftest import ROOT, cli, run_cli
from tests.faults import assert_refused, assert_unchanged, hashes
from tests.smoke.test_cli import TINY

TEXTS = [f"the review {i} says it was {w}" for i, w in enumerate(["good", "bad", "lovely", "awful"] * 30)]
PRETRAIN = ["pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), *TINY, "train.ckpt_every=2", "train.eval_every=2",
            "train.tensorboard=false"]


def _tok(texts=TEXTS) -> Tokenizer:
    return Tokenizer.train(texts, vocab_size=300, special_tokens=["<|endoftext|>"])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny lmforge base model dir, a LoRA adapter trained on it (B=0 is enough to merge), and a real run dir
    (4 pretraining steps)."""
    root = tmp_path_factory.mktemp("guards")
    tok = _tok()
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(family="gpt2", vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=2,
                                    max_seq_len=64, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id))
    save_model(model, root / "base", tokenizer=tok)
    cfg = DeltaConfig(method="lora")
    apply_delta(model, cfg, tok)
    save_delta(model, root / "adapter", cfg, base_model=str(root / "base"))
    proc = run_cli(*PRETRAIN, f"run_dir={root / 'run'}", "max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _merge(made, out, *extra):
    return cli("merge", "--base", str(made / "base"), "--adapter", str(made / "adapter"), "--out", str(out), *extra)


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_merge_out_run_dir_is_refused(made, force):
    before = hashes(made)
    assert_refused(_merge(made, made / "run", *force), "run dir", str(made / "run"))
    assert_unchanged(before)


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("out, word", [("base", "is --base"), ("base/sub", "is inside --base"),
                                       ("adapter", "is --adapter"), (".", "holds --base")])
def test_merge_out_over_its_inputs_is_refused_even_forced(made, force, out, word):
    before = hashes(made)
    assert_refused(_merge(made, made / out, *force), word)
    assert_unchanged(before)


def test_merge_out_with_files_needs_force_and_keeps_them(made, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = hashes(made, out)
    assert_refused(_merge(made, out), "already holds files", "notes.txt", "--force")
    assert_unchanged(before)
    proc = _merge(made, out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert_unchanged(before)  # notes.txt kept
    assert load_model(out)[0].config.vocab_size == 300
    # its own output from before is another job's: refused again without --force, replaced whole with it
    clean = tmp_path / "clean"
    assert _merge(made, clean).returncode == 0
    assert_refused(_merge(made, clean), "written by lmforge's 'merge'")
    assert _merge(made, clean, "--force").returncode == 0
    assert {p.name for p in clean.iterdir()} == set(read_marker(clean)["files"])


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_tokenizer_train_into_a_model_dir_is_refused(made, force):
    before = hashes(made)
    proc = cli("tokenizer", "train", "--data", str(made / "run" / "metrics.jsonl"), "--field", "step", "--vocab-size",
               "300", "--out", str(made / "base"), *force)
    assert_refused(proc, "model directory", str(made / "base"))
    assert_unchanged(before)


def test_tokenizer_train_into_a_dir_with_files_needs_force(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(TEXTS))
    out = tmp_path / "tok"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = hashes(out)
    args = ["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(out)]
    assert_refused(cli(*args), "already holds files", "--force")
    assert_unchanged(before)
    assert cli(*args, "--force").returncode == 0
    assert_unchanged(before)
    assert Tokenizer.load(out).vocab_size == 300 and read_marker(out)["command"] == "tokenizer train"


def test_world_out_existing_file_needs_force(tmp_path):
    out = tmp_path / "w.jsonl"
    out.write_text("mine\n")
    before = hashes(out)
    assert_refused(cli("world", "--out", str(out), "--bytes", "2000"), "already exists", "--force")
    assert_unchanged(before)
    assert_refused(cli("world", "--out", str(tmp_path), "--bytes", "2000"), "is a directory")
    assert cli("world", "--out", str(out), "--bytes", "2000", "--force").returncode == 0
    assert json.loads(out.read_text().splitlines()[0])["text"]


def test_run_dir_holding_a_users_model_is_refused(made, tmp_path):
    """A dir that is not a run but holds a model/ (a copy of one lmforge wrote: still the user's) and a file."""
    run = tmp_path / "r"
    shutil.copytree(made / "base", run / "model")
    (run / "notes.txt").write_text("mine")
    before = hashes(run)
    for cmd in (PRETRAIN, ["finetune", f"model={made / 'base'}", "task.name=world-sentiment", "task.n_train=40"]):
        assert_refused(cli(*cmd, f"run_dir={run}"), "holds no run", "model/", "overwrite=true")
        assert_unchanged(before)


def test_run_whose_model_dir_lmforge_did_not_write_is_refused_then_overwrite_keeps_the_rest(made, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(made / "run", run)
    (run / "model" / MARKER).unlink()  # a model/ lmforge did not write (e.g. the user's save_pretrained)
    (run / "model" / "README.md").write_text("my notes")
    before = hashes(run / "model")
    assert_refused(cli(*PRETRAIN, f"run_dir={run}", "max_steps=4", "resume=auto"), "model/", "did not write",
                   "overwrite=true")
    assert_unchanged(before)
    proc = run_cli(*PRETRAIN, f"run_dir={run}", "max_steps=4", "resume=auto", "overwrite=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "model" / "README.md").read_text() == "my notes"  # replaced only what the run writes
    assert "README.md" not in read_marker(run / "model")["files"]
    load_model(run / "model")


def test_rerun_of_the_same_run_re_exports_and_resume_continues(made, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(made / "run", run)
    first = read_marker(run / "model")
    assert first["command"] == "pretrain" and first["tokenizer"]["vocab_size"] == 512
    proc = run_cli(*PRETRAIN, f"run_dir={run}", "max_steps=6", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r][-2:] == [4, 6]  # continued from step 4
    assert (run / "model" / "model.safetensors").read_bytes() != (made / "run" / "model" /
                                                                  "model.safetensors").read_bytes()
    assert {p.name for p in (run / "model").iterdir()} == set(read_marker(run / "model")["files"])
    load_model(run / "model")


def test_swapped_tokenizer_of_the_same_size_is_refused(made, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(made / "base", model)
    other = _tok([t.replace("review", "story") for t in TEXTS])
    assert other.vocab_size == 300 and other.fingerprint != Tokenizer.load(model).fingerprint
    (model / "tokenizer.json").write_text(other.to_json_str())
    before = hashes(model)
    for cmd in (["generate", "--model", str(model), "--prompt", "the", "--max-new-tokens", "2"],
                ["eval", "perplexity", "--model", str(model), "--data", "world", "--max-docs", "2"]):
        assert_refused(cli(*cmd), str(model / "tokenizer.json"), str(model / MARKER), "fingerprint")
    assert_unchanged(before)


def test_hf_dir_with_a_tokenizer_larger_than_its_embeddings_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = tmp_path / "hf"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=280, n_positions=32, n_embd=16, n_layer=1,
                                                         n_head=2, bos_token_id=0, eos_token_id=0)).save_pretrained(hf)
    _tok().save(hf)  # 300 ids, 280 rows; lmforge did not write the dir: no marker, the size is what is checked
    before = hashes(hf)
    assert_refused(cli("generate", "--model", str(hf), "--prompt", "the", "--max-new-tokens", "2"), "300 tokens",
                   "280 embedding rows")
    assert_unchanged(before)
