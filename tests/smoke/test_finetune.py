"""`lmforge finetune` end to end on small random Hugging Face checkpoints built here (GPT-2, BERT, T5), user
task files and world tasks: the run finishes, writes its metrics/report/model, the saved classifier loads in
transformers with equal logits, and each bad input is a clear one-line error."""

import json

import pytest
import torch

from tests.conftest import cli, run_cli
from tests.smoke.test_cli import assert_clean_error

transformers = pytest.importorskip("transformers")

TEXTS = [f"the review {i} says it was {w}" for i, w in enumerate(["good", "bad", "lovely", "awful"] * 30)]
FAST = ["max_steps=12", "train.global_batch_size=8", "train.eval_every=6", "train.ckpt_every=6", "train.log_every=3",
        "train.warmup_steps=2", "train.lr=1e-3", "train.tensorboard=false", "eval_batch_size=16"]


def _tokenizer(special):
    from lmforge.core.tokenizer import Tokenizer

    return Tokenizer.train(TEXTS, vocab_size=300, special_tokens=special)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Random transformers checkpoints + lmforge-trained tokenizers (GPT-2's has no pad token)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    gpt_tok = _tokenizer(["<|endoftext|>"])
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=gpt_tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=gpt_tok.eos_id, eos_token_id=gpt_tok.eos_id))
    gpt.save_pretrained(root / "gpt2")
    gpt_tok.save(root / "gpt2")
    bert_tok = _tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    bert = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=bert_tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=bert_tok.pad_id))
    bert.save_pretrained(root / "bert")
    bert_tok.save(root / "bert")
    from lmforge.data.span import add_sentinels

    t5_tok = add_sentinels(_tokenizer(["<pad>", "</s>", "<unk>"]), 8)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=t5_tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=t5_tok.pad_id, eos_token_id=t5_tok.eos_id, decoder_start_token_id=t5_tok.pad_id))
    t5.save_pretrained(root / "t5")
    t5_tok.save(root / "t5")
    data = root / "data"
    data.mkdir()
    rows = [{"text": t, "label": "pos" if any(w in t for w in ("good", "lovely")) else "neg"} for t in TEXTS]
    (data / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:100]), encoding="utf-8")
    (data / "cls_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[100:]), encoding="utf-8")
    qa = [{"input": f"which word ends: {t}", "target": t.split()[-1]} for t in TEXTS]
    (data / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa), encoding="utf-8")
    return root


def _finetune(run_dir, model, *extra):
    proc = run_cli("finetune", f"run_dir={run_dir}", f"model={model}", *FAST, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("family, auto", [("gpt2", "AutoModelForSequenceClassification"),
                                          ("bert", "AutoModelForSequenceClassification")])
def test_hf_checkpoint_classifier_end_to_end(hf_dirs, tmp_path, family, auto):
    data = hf_dirs / "data"
    extra = ["head.reinit_pooler=true"] if family == "bert" else []  # a fresh pooler, still a plain HF model
    res = _finetune(tmp_path / "run", hf_dirs / family, "task.name=null", f"task.train={data / 'cls.jsonl'}",
                    f"task.test={data / 'cls_test.jsonl'}", *extra)
    assert res["mode"] == "head" and set(res["test"]) >= {"accuracy", "macro_f1", "loss"}
    assert res["baselines"]["majority"]["accuracy"] == pytest.approx(0.5, abs=0.1)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in rows) and "test_accuracy" in rows[-1]
    assert (tmp_path / "run" / "report.md").read_text().count("baseline") >= 2

    from lmforge.models.io import load_model

    ours, tok = load_model(tmp_path / "run" / "model")
    assert tok.pad_id is not None and tok.pad_id != tok.eos_id
    ref, info = getattr(transformers, auto).from_pretrained(tmp_path / "run" / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ref.config.id2label == {0: "neg", 1: "pos"} and ref.config.pad_token_id == tok.pad_id
    if family == "bert":  # re-initialised, not the pretrained pooler moved by 12 small steps
        base = transformers.BertForPreTraining.from_pretrained(hf_dirs / "bert").bert.pooler.dense.weight
        assert (ref.bert.pooler.dense.weight - base).abs().max() > 0.04  # Adam moves a weight <= ~12 x lr = 0.012
    from lmforge.objectives.classification import ClassificationObjective

    obj = ClassificationObjective(tok, family, {"neg": 0, "pos": 1}, 64)
    batch = obj.collate([obj.encode({"text": t, "label": "pos"}) for t in TEXTS[:3] + ["good"]])
    with torch.no_grad():
        kw = {"token_type_ids": batch["token_type_ids"]} if family == "bert" else {}
        mine = ours.eval()(batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
        theirs = ref.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_t5_text2text_and_gpt2_completion(hf_dirs, tmp_path):
    qa = hf_dirs / "data" / "qa.jsonl"
    for family in ("t5", "gpt2"):
        res = _finetune(tmp_path / family, hf_dirs / family, "task.name=null", f"task.train={qa}", f"task.test={qa}",
                        "max_new_tokens=6")
        assert res["mode"] == ("seq2seq" if family == "t5" else "completion")
        assert set(res["test"]) >= {"exact_match", "token_f1", "loss"}
        assert (tmp_path / family / "model" / "config.json").is_file()
        # every test prediction is kept, and they are the ones the exact-match figure was computed from
        preds = [json.loads(x) for x in (tmp_path / family / "predictions-test.jsonl").read_text().splitlines()]
        gold = [json.loads(x) for x in qa.read_text().splitlines()]
        assert [(p["input"], p["gold"]) for p in preds] == [(g["input"], g["target"]) for g in gold]
        from lmforge.eval.task_metrics import exact_match

        assert exact_match([p["prediction"] for p in preds], [p["gold"] for p in preds]) == res["test"]["exact_match"]


def test_t5_does_classification_as_text(hf_dirs, tmp_path):
    data = hf_dirs / "data"
    res = _finetune(tmp_path / "run", hf_dirs / "t5", "task.name=null", f"task.train={data / 'cls.jsonl'}",
                    f"task.test={data / 'cls_test.jsonl'}", "max_new_tokens=4")
    assert res["mode"] == "seq2seq" and "accuracy" in res["test"] and "bag_of_words" in res["baselines"]


def test_truncation_is_counted_not_fatal(hf_dirs, tmp_path):
    data = hf_dirs / "data"
    res = _finetune(tmp_path / "run", hf_dirs / "bert", "task.name=null", f"task.train={data / 'cls.jsonl'}",
                    "task.max_length=6", "max_steps=2")
    assert res["truncated"]["train"] > 0
    assert "Truncated to the model's maximum length: train" in (tmp_path / "run" / "report.md").read_text()


def test_bad_inputs_are_one_line_errors(hf_dirs, tmp_path):
    data = hf_dirs / "data"
    proc = cli("finetune", f"run_dir={tmp_path / 'a'}", f"model={hf_dirs / 'bert'}", "task.name=null",
                   f"task.train={data / 'qa.jsonl'}")
    assert_clean_error(proc, "task type 'text2text' is not available for model family 'bert'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "pos"}\n{"text": "meh", "label": "neg"}\n', encoding="utf-8")
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "fine", "label": "pos"}\n{"text": "", "label": "neg"}\n', encoding="utf-8")
    proc = cli("finetune", f"run_dir={tmp_path / 'b'}", f"model={hf_dirs / 'bert'}", "task.name=null",
                   f"task.train={bad}", f"task.validation={val}")
    assert_clean_error(proc, "val.jsonl:2: field 'text' is empty")
    proc = cli("finetune", f"run_dir={tmp_path / 'c'}", f"model={hf_dirs / 'gpt2'}", "task.name=world-ner")
    assert_clean_error(proc, "token classification needs a bidirectional encoder")
    proc = cli("finetune", f"run_dir={tmp_path / 'e'}", f"model={hf_dirs / 'gpt2'}", "task.name=null",
               f"task.train={data / 'cls.jsonl'}", "head.reinit_pooler=true")
    assert_clean_error(proc, "head.reinit_pooler applies to BERT sequence classifiers")
    proc = cli("finetune", f"run_dir={tmp_path / 'd'}", f"model={tmp_path / 'nothing'}")
    assert_clean_error(proc, "is neither a model directory")


def test_pipeline_t5_finetune_stage_uses_the_qa_recipe(tmp_path):
    """The T5 pipeline's fine-tuning stage is configs/finetune-t5-qa.yaml's recipe (Adafactor, frozen tied head,
    counterfactual answers): with AdamW and a trained head the QA fine-tune falls below random init (RESULTS.md)."""
    import yaml

    from tests.conftest import ROOT

    run_dir = tmp_path / "pipe"
    proc = run_cli("pipeline", str(ROOT / "configs/tiny-t5.yaml"), f"run_dir={run_dir}", "max_steps=4",
                   "data.world_bytes=300000", "tokenizer.train_bytes=150000", "model.vocab_size=612",
                   "model.d_model=32", "model.d_kv=8", "model.num_heads=2", "model.d_ff=64", "model.num_layers=1",
                   "span.inputs_length=32", "train.global_batch_size=4", "train.eval_every=2", "train.ckpt_every=2",
                   "train.eval_max_batches=1", "train.warmup_steps=1", "samples.max_new_tokens=4",
                   "finetune.max_steps=2", "finetune.n_train=64", "finetune.global_batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["finetune"]["task"] == "world-qa-context" and "exact_match" in summary["finetune"]["test"]
    cfg = yaml.safe_load((run_dir / "finetune" / "config.yaml").read_text())
    assert (cfg["train"]["optimizer"], cfg["train"]["freeze"], cfg["train"]["lr"]) == ("adafactor", ["shared"], 1e-2)
    assert cfg["task"]["counterfactual"] == 1.0


def test_probe_copy_script_runs_and_both_t5_implementations_start_equal(hf_dirs):
    """benchmarks/probe_copy.py on the tiny random T5: the same seed gives the same batches, so the first step's
    loss (before any update) is the same for lmforge's T5 and transformers' on the same weights."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    first = {}
    for impl in ("lmforge", "transformers"):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_copy.py"), "--model",
                               str(hf_dirs / "t5"), "--impl", impl, "--steps", "2", "--every", "1", "--batch", "4"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
        assert len(lines) == 2 and "first answer token accuracy" in lines[0]
        first[impl] = float(lines[0].split("| loss ")[1].split()[0])
    assert first["lmforge"] == pytest.approx(first["transformers"], abs=2e-3)


def test_probe_collapse_measures_cosine_and_block_norms(hf_dirs, tmp_path):
    """benchmarks/probe_collapse.py: the cosine helper is right on known vectors, and on the tiny random T5 the
    script prints one block norm per encoder block and a cosine far from 1 (a fresh encoder keeps tokens apart);
    a collapsed encoder (one huge constant direction added to every token's residual stream) reads near 1."""
    import importlib.util
    import subprocess
    import sys

    from lmforge.models.io import load_model
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("probe_collapse", ROOT / "benchmarks" / "probe_collapse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.mean_offdiag_cosine(torch.eye(4)) == pytest.approx(0.0)
    assert mod.mean_offdiag_cosine(torch.ones(3, 5)) == pytest.approx(1.0)

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_collapse.py"), "--model",
                           str(hf_dirs / "t5"), "--n", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    model, tok = load_model(hf_dirs / "t5")
    norms = line.split("block norms ")[1].split(" |")[0].split(" / ")
    assert len(norms) == len(model.encoder.blocks)
    fresh = float(line.rsplit("final output cosine ", 1)[1])
    assert fresh < 0.8

    with torch.no_grad():  # the failure it detects: every block writes the same large vector
        for block in model.encoder.blocks:
            block.ff.wo.weight.zero_()
            block.ff.wo.weight[0, :] = 50.0
    ids = torch.tensor([list(tok.encode("the price was not bad at all")) + [tok.eos_id]])
    _, out = mod.encoder_trace(model, ids)
    assert mod.mean_offdiag_cosine(out) > 0.95

    bert = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_collapse.py"), "--model",
                           str(hf_dirs / "bert")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bert.returncode == 2 and "this probe reads a T5 encoder" in bert.stderr
