"""The CLI end to end on tiny configs: --help everywhere, a tiny pretrain, eval and generate on its model,
and the one-line errors of the core issue (each: non-zero exit, message naming the culprit, no traceback)."""

import json

import pytest

from lmforge.data.sources import iter_documents
from tests.conftest import ROOT, cli, run_cli

TINY = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.vocab_size=512", "model.max_seq_len=64",
        "data.seq_len=32", "data.world_bytes=400000", "tokenizer.train_bytes=200000", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.log_every=5", "train.eval_every=10", "train.ckpt_every=10",
        "train.eval_max_batches=2", "train.warmup_steps=2"]


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    proc = run_cli("pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={run_dir}", "max_steps=20", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("cmd", [[], ["pretrain"], ["pipeline"], ["tokenizer"], ["tokenizer", "train"], ["eval"],
                                 ["eval", "perplexity"], ["generate"], ["world"], ["cache", "clear"]])
def test_help(cmd):
    proc = cli(*cmd, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_tiny_pretrain_writes_the_run_dir(tiny_run):
    for name in ("config.yaml", "metrics.jsonl", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "model/tokenizer_config.json", "model/generation_config.json"):
        assert (tiny_run / name).exists(), name
    rows = [json.loads(ln) for ln in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s"):
        assert key in rows[0]
    assert any("val_loss" in r for r in rows)
    assert rows[-1]["step"] == 20 and rows[-1]["loss"] < rows[0]["loss"]
    assert (tiny_run / "checkpoints" / "step_0000020" / "COMPLETE").exists()


def test_eval_perplexity_json(tiny_run, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The town of Theihild lies in the north.\n\nA story about a beekeeper.\n")
    proc = run_cli("eval", "perplexity", "--model", str(tiny_run / "model"), "--data", str(text), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["perplexity"] > 1 and out["bits_per_byte"] > 0 and out["tokens"] > 5
    # the window the model was trained with (data.seq_len=32, recorded at export), not its 64 positions
    assert json.loads((tiny_run / "model" / "lmforge.json").read_text())["train_window"] == 32
    assert (out["window"], out["window_from"], out["stride"]) == (32, "training window", 16)
    proc = cli("eval", "perplexity", "--model", str(tiny_run / "model"), "--data", str(text), "--max-length", "64")
    assert proc.returncode == 0, proc.stderr
    assert "(window 64 = --max-length, stride 32)" in proc.stdout


def test_generate_greedy(tiny_run):
    proc = run_cli("generate", "--model", str(tiny_run / "model"), "--prompt", "The town of", "--max-new-tokens", "8",
                   "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The town of") and len(proc.stdout.strip()) > len("The town of")
    again = run_cli("generate", "--model", str(tiny_run / "model"), "--prompt", "The town of", "--max-new-tokens",
                    "8", "--temperature", "0")
    assert again.stdout == proc.stdout


def test_existing_run_dir_without_resume(tiny_run):
    proc = cli("pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={tiny_run}", "max_steps=20", *TINY)
    assert_clean_error(proc, str(tiny_run), "resume=true")


def test_unknown_config_key(tmp_path):
    proc = cli("pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={tmp_path / 'r'}", "train.lrr=1")
    assert_clean_error(proc, "train.lrr", "did you mean 'lr'")


def test_missing_data_path(tmp_path):
    proc = cli("eval", "perplexity", "--model", str(tmp_path), "--data", str(tmp_path / "nope.txt"))
    assert_clean_error(proc)
    proc = cli("tokenizer", "train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "tok"))
    assert_clean_error(proc, "nope.txt")


def test_empty_data_path(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    proc = cli("tokenizer", "train", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "tok"))
    assert_clean_error(proc, "empty.txt")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    proc = cli("tokenizer", "train", "--data", str(bad), "--out", str(tmp_path / "tok"))
    assert_clean_error(proc, "bad.jsonl:3")


def test_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    proc = cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert_clean_error(proc, str(tmp_path))


def test_unsupported_hf_config_field(tiny_run, tmp_path):
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_run / "model", model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["scale_attn_by_inverse_layer_idx"] = True
    (model_dir / "config.json").write_text(json.dumps(cfg))
    proc = cli("generate", "--model", str(model_dir), "--prompt", "hi")
    assert_clean_error(proc, "scale_attn_by_inverse_layer_idx")


def test_tokenizer_model_vocab_mismatch(tiny_run, tmp_path):
    import shutil

    tok_dir = tmp_path / "bigtok"
    proc = cli("tokenizer", "train", "--data", "world", "--vocab-size", "1024", "--max-bytes", "300000",
                   "--out", str(tok_dir))
    assert proc.returncode == 0, proc.stderr
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_run / "model", model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, model_dir / f)
    proc = cli("generate", "--model", str(model_dir), "--prompt", "hi")
    assert_clean_error(proc, "512")
    proc = cli("pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={tmp_path / 'r2'}",
                   f"tokenizer.path={tok_dir}", *TINY)
    assert_clean_error(proc, "1024", "model.vocab_size")


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = cli("pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={blocker}/sub", *TINY)
    assert_clean_error(proc, "run dir")


def test_accumulation_must_divide(tmp_path):
    proc = cli("pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={tmp_path / 'r'}",
                   "train.global_batch_size=10", "train.micro_batch_size=4")
    assert_clean_error(proc, "global_batch_size=10", "micro_batch_size=4")


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    proc = run_cli("pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={run_dir}", "max_steps=12", *TINY,
                   "train.micro_batch_size=8", "train.lr=1e9", "train.grad_clip=0", "train.warmup_steps=0",
                   "train.log_every=1", "train.ckpt_every=1", "train.eval_every=0")
    assert_clean_error(proc, "loss is nan at step", "checkpoint")
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ckpts and all((c / "COMPLETE").exists() for c in ckpts)
    bad_step = int(proc.stderr.split("at step ")[1].split(";")[0])
    assert max(int(c.name.split("_")[1]) for c in ckpts) < bad_step


def test_resume_after_changed_model_config_is_refused(tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    over = [o for o in TINY if not o.startswith("model.d_model")] + ["model.d_model=96"]
    proc = run_cli("pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={run_dir}", "max_steps=30",
                   "resume=true", *over)
    assert_clean_error(proc, "model.d_model")
    # and nothing already saved was lost
    assert (run_dir / "checkpoints" / "step_0000020" / "COMPLETE").exists()
    assert (run_dir / "model" / "model.safetensors").read_bytes() == (tiny_run / "model" / "model.safetensors").read_bytes()


def test_pretrained_tiny_gpt_loads_in_transformers_with_equal_logits(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.models.io import load_model

    ours, tok = load_model(tiny_run / "model")
    ref = AutoModelForCausalLM.from_pretrained(tiny_run / "model").eval()
    ids = torch.tensor([tok.encode("The town of Theihild lies in the north. A story about a beekeeper.")])
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_tokenizer_train_says_when_the_vocabulary_came_out_smaller(tmp_path):
    data = tmp_path / "small.txt"
    data.write_text("The town of Theihild lies in the north.\n\nA story about a beekeeper and her bees.\n" * 3)
    proc = cli("tokenizer", "train", "--data", str(data), "--vocab-size", "8000", "--out", str(tmp_path / "tok"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    size = len(got["model"]["vocab"])
    assert 258 < size < 8000 and f"({size} tokens" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"vocabulary has {size} tokens, fewer than the 8000 asked" in lines[0]
    docs = list(iter_documents(data))  # the text it trained on: the file's paragraphs
    assert f"({sum(len(d.encode()) for d in docs):,} bytes in {len(docs)} documents)" in lines[0]
    assert "min_frequency=2" in lines[0] and "--vocab-size" in lines[0] and not lines[0].startswith("error:")
    proc = cli("tokenizer", "train", "--data", str(data), "--vocab-size", "260", "--out", str(tmp_path / "tok2"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # got what it asked: nothing to say
