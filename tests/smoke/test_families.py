"""`lmforge pretrain` picks the objective from the model family: a few steps of tiny BERT (MLM+NSP) and T5
(span corruption + text infilling, configs/tiny-t5.yaml) through the CLI, their models in transformers, and the encoder/encoder-decoder commands."""

import json

import pytest

from tests.conftest import ROOT, run_cli
from tests.smoke.test_cli import assert_clean_error

COMMON = ["data.world_bytes=400000", "tokenizer.train_bytes=200000", "train.global_batch_size=8",
          "train.log_every=5", "train.eval_every=10", "train.ckpt_every=10", "train.eval_max_batches=2",
          "train.warmup_steps=2", "max_steps=20"]
BERT = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.vocab_size=512", "model.max_seq_len=64",
        "data.seq_len=48", *COMMON]
T5 = ["model.num_layers=2", "model.d_model=64", "model.d_kv=16", "model.num_heads=4", "model.d_ff=128",
      "model.vocab_size=612", "span.inputs_length=48", *COMMON]


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "bert"
    proc = run_cli("pretrain", str(ROOT / "configs/tiny-bert.yaml"), f"run_dir={run_dir}", *BERT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "t5"
    proc = run_cli("pretrain", str(ROOT / "configs/tiny-t5.yaml"), f"run_dir={run_dir}", *T5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _rows(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bert_pretrains_with_mlm_and_nsp_metrics(bert_run):
    rows = _rows(bert_run)
    for key in ("mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc"):
        assert key in rows[-1], key
    assert "val_mlm_acc" in rows[-1] and rows[-1]["loss"] < rows[0]["loss"]


def test_bert_model_loads_in_transformers_with_equal_outputs(bert_run):
    import torch
    from transformers import BertForPreTraining

    from lmforge.models.io import load_model

    ours, tok = load_model(bert_run / "model")
    ref = BertForPreTraining.from_pretrained(bert_run / "model").eval()
    ids = torch.tensor([[tok.cls_id, *tok.encode("The town of Theihild lies in the north."), tok.sep_id]])
    with torch.no_grad():
        hidden = ours(ids)
        out = ref(input_ids=ids)
        torch.testing.assert_close(ours.mlm_logits(hidden), out.prediction_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.nsp_logits(ours.pooled(hidden)), out.seq_relationship_logits,
                                   rtol=1e-5, atol=1e-5)


def test_fill_mask_and_pseudo_perplexity(bert_run, tmp_path):
    proc = run_cli("fill-mask", "--model", str(bert_run / "model"), "--text", "The [MASK] of Theihild.", "--top-k",
                   "3", "--json")
    assert proc.returncode == 0, proc.stderr
    preds = json.loads(proc.stdout.strip().splitlines()[-1])["predictions"]
    assert len(preds) == 1 and len(preds[0]) == 3 and preds[0][0][1] >= preds[0][1][1]
    text = tmp_path / "t.txt"
    text.write_text("The town of Theihild lies in the north.\n")
    proc = run_cli("eval", "perplexity", "--model", str(bert_run / "model"), "--data", str(text), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kind"] == "pseudo-perplexity" and out["perplexity"] > 1


def test_t5_pretrains_with_span_corruption(t5_run):
    rows = _rows(t5_run)
    assert "target_acc" in rows[-1] and "val_target_acc" in rows[-1] and rows[-1]["loss"] < rows[0]["loss"]


def test_t5_model_loads_in_transformers_and_generates(t5_run, tmp_path):
    import torch
    from transformers import T5ForConditionalGeneration

    from lmforge.models.io import load_model

    ours, tok = load_model(t5_run / "model")
    ref = T5ForConditionalGeneration.from_pretrained(t5_run / "model").eval()
    ids = torch.tensor([tok.encode("The town of <extra_id_0> lies in the north.") + [tok.eos_id]])
    dec = torch.tensor([[0, 5, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids, decoder_input_ids=dec)),
                                   ref(input_ids=ids, decoder_input_ids=dec).logits, rtol=1e-5, atol=1e-5)
    proc = run_cli("generate", "--model", str(t5_run / "model"), "--prompt", "The town of <extra_id_0> lies.",
                   "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["results"][0]["tokens"] >= 1
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["The town of Theihild lies in the north, near the old forest."] * 12))
    proc = run_cli("eval", "perplexity", "--model", str(t5_run / "model"), "--data", str(text), "--max-length", "48",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kind"] == "span-corruption" and out["tokens"] > 0


def test_t5_input_length_the_arithmetic_cannot_serve(tmp_path):
    proc = run_cli("pretrain", str(ROOT / "configs/tiny-t5.yaml"), f"run_dir={tmp_path / 'r'}",
                   *[o for o in T5 if not o.startswith("span.")], "span.inputs_length=3")
    assert_clean_error(proc, "inputs_length")


def test_vocabulary_without_mask_or_sentinels(tmp_path):
    tok_dir = tmp_path / "tok"
    proc = run_cli("tokenizer", "train", "--data", "world", "--vocab-size", "512", "--max-bytes", "200000",
                   "--out", str(tok_dir))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("pretrain", str(ROOT / "configs/tiny-bert.yaml"), f"run_dir={tmp_path / 'b'}",
                   f"tokenizer.path={tok_dir}", *BERT)
    assert_clean_error(proc, "[MASK]")
    proc = run_cli("pretrain", str(ROOT / "configs/tiny-t5.yaml"), f"run_dir={tmp_path / 't'}",
                   f"tokenizer.path={tok_dir}", *T5)
    assert_clean_error(proc, "extra_id")
