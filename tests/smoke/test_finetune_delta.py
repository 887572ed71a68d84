"""`lmforge finetune peft.method=...` end to end on small random transformers checkpoints: the delta trains with
the backbone frozen, the adapter dir is PEFT's format (LoRA/DoRA) and loads in PEFT on the transformers model
with the fine-tuned model's logits, the merged model loads in plain transformers, `lmforge merge` rebuilds it
from base + adapter, and a bad method or target is a one-line error."""

import json

import pytest
import torch

from tests.conftest import cli, run_cli
from tests.smoke.test_cli import assert_clean_error
from tests.smoke.test_finetune import FAST, TEXTS, _finetune, hf_dirs  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _batch(tok, family):
    from lmforge.objectives.classification import ClassificationObjective

    obj = ClassificationObjective(tok, family, {"neg": 0, "pos": 1}, 64)
    return obj.collate([obj.encode({"text": t, "label": "pos"}) for t in TEXTS[:3] + ["good"]])


def test_lora_classifier_adapter_loads_in_peft(hf_dirs, tmp_path):  # noqa: F811
    data = hf_dirs / "data"
    run = tmp_path / "run"
    res = _finetune(run, hf_dirs / "gpt2", "task.name=null", f"task.train={data / 'cls.jsonl'}",
                    f"task.test={data / 'cls_test.jsonl'}", "peft.method=lora", "peft.r=4", "train.lr=5e-3")
    d = res["delta"]
    assert d["method"] == "lora" and 0 < d["percent"] < 50 and d["lora_layers"] == 2
    assert res["trainable_params"] == d["trainable"]
    pc = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert pc["task_type"] == "SEQ_CLS" and pc["target_modules"] == ["c_attn"]
    assert "Delta tuning **lora**" in (run / "report.md").read_text()

    from lmforge.models.io import load_model

    merged, tok = load_model(run / "model")  # the merged classifier: a plain checkpoint
    batch = _batch(tok, "gpt2")
    with torch.no_grad():
        want = merged.eval()(batch["input_ids"], attention_mask=batch["attention_mask"])
    # PEFT on the transformers base: the base as fine-tuning saw it (pad token added -> one more embedding row)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dirs / "gpt2", num_labels=2)
    base.resize_token_embeddings(tok.vocab_size)
    base.config.pad_token_id = tok.pad_id
    got = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        theirs = got(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, want, rtol=1e-5, atol=1e-5)

    proc = run_cli("merge", "--base", str(hf_dirs / "gpt2"), "--adapter", str(run / "adapter"), "--out",
                   str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   want, rtol=1e-5, atol=1e-5)


def test_bitfit_on_bert_and_dora_on_t5(hf_dirs, tmp_path):  # noqa: F811
    """Also: without train.lr BitFit trains at its own default learning rate, said on the terminal and recorded in
    config.yaml, results.json and report.md; DoRA given train.lr trains at that."""
    from lmforge.delta.registry import get_method

    data = hf_dirs / "data"
    fast = [a for a in FAST if not a.startswith("train.lr=")]
    proc = run_cli("finetune", f"run_dir={tmp_path / 'b'}", f"model={hf_dirs / 'bert'}", *fast, "task.name=null",
                   f"task.train={data / 'cls.jsonl'}", "peft.method=bitfit")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["delta"]["method"] == "bitfit" and res["delta"]["percent"] < 10
    lr = get_method("bitfit").train_defaults["lr"]
    assert (res["lr"], res["lr_from"]) == (lr, "bitfit's default") and f"lr {lr:g} (bitfit's default)" in proc.stderr
    assert f"peak learning rate {lr:g} (bitfit's default)" in (tmp_path / "b" / "report.md").read_text()
    saved = (tmp_path / "b" / "config.yaml").read_text()
    assert f"  lr: {lr}\n" in saved and "lr_from: bitfit's default" in saved
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in rows if "lr" in r) <= lr and any(r.get("lr", 0) > lr / 2 for r in rows)  # trained at it
    meta = json.loads((tmp_path / "b" / "adapter" / "delta_config.json").read_text())
    assert meta["format"] == "lmforge-delta" and len(meta["base_fingerprint"]) == 64
    qa = data / "qa.jsonl"
    res = _finetune(tmp_path / "t", hf_dirs / "t5", "task.name=null", f"task.train={qa}", "max_new_tokens=4",
                    "peft.method=dora", "peft.r=2")
    assert res["delta"]["lora_layers"] == 12 and res["mode"] == "seq2seq"  # q, v of 2 enc + 2x2 dec attentions
    assert (res["lr"], res["lr_from"]) == (1e-3, "train.lr")  # FAST's train.lr: the user's value wins
    assert json.loads((tmp_path / "t" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True


def test_bad_delta_settings_are_one_line_errors(hf_dirs, tmp_path):  # noqa: F811
    data = hf_dirs / "data"
    common = ["task.name=null", f"task.train={data / 'cls.jsonl'}"]
    proc = cli("finetune", f"run_dir={tmp_path / 'a'}", f"model={hf_dirs / 'gpt2'}", *common, "peft.method=lorra")
    assert_clean_error(proc, "peft.method: 'lorra' is not a delta method")
    proc = cli("finetune", f"run_dir={tmp_path / 'b'}", f"model={hf_dirs / 'gpt2'}", *common, "peft.method=lora",
                   "peft.target_modules=[q_proj]")
    assert_clean_error(proc, "matches no Linear layer")
    proc = cli("finetune", f"run_dir={tmp_path / 'c'}", f"model={hf_dirs / 'bert'}", *common, "peft.method=lora",
               "head.reinit_pooler=true")
    assert_clean_error(proc, "would leave a random pooler frozen")


def test_bert_delta_with_a_fresh_trained_pooler_and_its_own_head_lr(hf_dirs, tmp_path):  # noqa: F811
    """head.reinit_pooler with a delta: the pooler restarts and trains (bitfit+modules), the classifier at its own
    learning rate; every other weight stays byte-identical to the base, and the delta carries the pooler."""
    from safetensors.torch import load_file

    data = hf_dirs / "data"
    run = tmp_path / "b"
    res = _finetune(run, hf_dirs / "bert", "task.name=null", f"task.train={data / 'cls.jsonl'}",
                    "peft.method=bitfit+modules", "peft.train_modules=[pooler]", "head.reinit_pooler=true",
                    "train.param_lr.classifier=1e-3")
    base = load_file(str(hf_dirs / "bert" / "model.safetensors"))
    delta = load_file(str(run / "adapter" / "delta.safetensors"))
    pooler = [k for k in delta if ".pooler." in k]
    assert len(pooler) == 2 and res["delta"]["trainable"] == sum(v.numel() for v in delta.values())
    tuned = load_file(str(run / "model" / "model.safetensors"))
    name = next(k for k in base if k.endswith("pooler.dense.weight"))
    assert not torch.equal(tuned[name], base[name])  # restarted (and trained), not the pretrained pooler
    frozen = [k for k in base if k in tuned and not k.endswith("bias") and "pooler" not in k]
    assert frozen and all(torch.equal(tuned[k], base[k]) for k in frozen)
    saved = (run / "config.yaml").read_text()
    assert "param_lr:" in saved and "classifier: 0.001" in saved


def test_bench_peft_table_memory_and_sizes(hf_dirs, tmp_path):  # noqa: F811
    data = hf_dirs / "data"
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"model: {hf_dirs / 'gpt2'}\ntask:\n  name: null\n  train: {data / 'cls.jsonl'}\n"
                   f"  test: {data / 'cls_test.jsonl'}\n", encoding="utf-8")
    fast = "[" + ",".join(x for x in ("max_steps=6", "train.global_batch_size=8", "train.eval_every=3",
                                      "train.ckpt_every=3", "train.tensorboard=false", "eval_batch_size=16")) + "]"
    proc = run_cli("bench", "peft", f"run_dir={tmp_path / 'bench'}", f"finetune={cfg}",
                   "methods=[full,lora,houlsby,bitfit]", "seeds=[0]", f"overrides={fast}", "lr={full: 0.001}",
                   "jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "bench" / "bench.json").read_text())
    rows = {r["method"]: r for r in out["summary"]}
    assert list(rows) == ["full", "lora", "houlsby", "bitfit"]  # table order, though two ran at a time
    assert not any(r["reused"] for r in out["runs"])
    assert rows["full"]["lr"] == 0.001 and rows["lora"]["lr"] == pytest.approx(0.005)
    # trainable counts: full trains everything; each delta far less
    assert rows["full"]["trainable_pct"] == pytest.approx(100.0)
    assert all(rows[m]["trainable"] < rows["full"]["trainable"] / 5 for m in ("lora", "houlsby", "bitfit"))
    # counted memory: full fine-tuning needs the most (gradients + AdamW state for every weight)
    mem = {m: r["memory"]["total"] for m, r in rows.items()}
    assert max(mem, key=mem.get) == "full" and all(v > 0 for v in mem.values())
    assert rows["lora"]["memory"]["optimizer"] == 8 * rows["lora"]["trainable"]
    # each saved delta's size is its saved parameters (+ small json files)
    from safetensors import safe_open

    run = tmp_path / "bench" / "runs" / "bitfit-seed0" / "adapter"
    with safe_open(str(run / "delta.safetensors"), "pt") as f:
        n_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert n_bytes <= (run / "delta.safetensors").stat().st_size <= n_bytes + 16384
    report = (tmp_path / "bench" / "report.md").read_text()
    assert "houlsby" in report and "Test accuracy vs full fine-tuning" in report
    assert (tmp_path / "bench" / "bench.png").is_file()
    # a second bench with the same commands reads the finished runs; a changed lr runs that method again
    proc = run_cli("bench", "peft", f"run_dir={tmp_path / 'bench'}", f"finetune={cfg}", "methods=[full,lora]",
                   "seeds=[0]", f"overrides={fast}", "lr={full: 0.001, lora: 0.002}", "method_overrides={lora: [peft.r=4]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = {r["method"]: r for r in json.loads((tmp_path / "bench" / "bench.json").read_text())["runs"]}
    assert again["full"]["reused"] and not again["lora"]["reused"]
    head = rows["lora"]["trainable"] - 2 * (rows["lora"]["trainable"] - again["lora"]["trainable"])
    assert again["lora"]["trainable"] < rows["lora"]["trainable"] and head == 2 * 32  # r 8 -> 4 halves the branches; the score head stays
    assert again["full"]["test_accuracy"] == out["runs"][0]["test_accuracy"]


def test_prompt_tuning_completion_on_gpt2_and_text_init_on_bert(hf_dirs, tmp_path):  # noqa: F811
    """Prompt tuning through the whole fine-tuning run: a GPT-2 completion task (training, then decoding with the
    prompt in the KV cache) saved in PEFT's format, and a BERT classifier whose prompt starts from a text."""
    data = hf_dirs / "data"
    run = tmp_path / "g"
    res = _finetune(run, hf_dirs / "gpt2", "task.name=null", f"task.train={data / 'qa.jsonl'}", "max_new_tokens=4",
                    "peft.method=prompt", "peft.num_virtual_tokens=5", "train.lr=3e-2")
    assert res["mode"] == "completion" and res["delta"]["method"] == "prompt"
    assert res["delta"]["merged"] is False and not (run / "model").exists()
    pc = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (pc["peft_type"], pc["task_type"], pc["num_virtual_tokens"]) == ("PROMPT_TUNING", "CAUSAL_LM", 5)
    res = _finetune(tmp_path / "b", hf_dirs / "bert", "task.name=null", f"task.train={data / 'cls.jsonl'}",
                    "peft.method=prompt", "peft.num_virtual_tokens=3", "peft.prompt_init=text",
                    "peft.prompt_init_text=this review is")
    head = 2 * 32 + 2  # classifier weight + bias (2 labels, d=32)
    assert res["delta"]["trainable"] == 3 * 32 + head


def test_prefix_on_t5_and_ladder_on_a_bert_classifier(hf_dirs, tmp_path):  # noqa: F811
    """Prefix tuning of T5 text-to-text (decoding with the prefix in the cache; lmforge's own format, which gives
    every decoder layer its own prefix) and ladder side tuning of a BERT classifier, each through `finetune`."""
    data = hf_dirs / "data"
    res = _finetune(tmp_path / "t", hf_dirs / "t5", "task.name=null", f"task.train={data / 'qa.jsonl'}",
                    "max_new_tokens=4", "peft.method=prefix", "peft.num_virtual_tokens=4", "peft.prefix_projection=true")
    assert res["mode"] == "seq2seq" and res["delta"]["method"] == "prefix"
    assert json.loads((tmp_path / "t" / "adapter" / "delta_config.json").read_text())["format"] == "lmforge-delta"
    run = tmp_path / "b"
    res = _finetune(run, hf_dirs / "bert", "task.name=null", f"task.train={data / 'cls.jsonl'}",
                    f"task.test={data / 'cls_test.jsonl'}", "peft.method=ladder", "peft.ladder_reduction=4",
                    "measure_memory=true")
    assert res["delta"]["method"] == "ladder" and res["delta"]["merged"] is False
    assert res["memory"]["total"] > 0 and "accuracy" in res["test"]
    assert (run / "adapter" / "delta.safetensors").is_file() and not (run / "model").exists()
