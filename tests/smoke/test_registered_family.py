"""A family registered from outside lmforge (tests/toy_family.py's ``toy``) goes through the layers above models
as the built-in ones do: `lmforge pretrain` reads ``model.family: toy`` (YAML and overrides) as the toy's config,
builds its model, trains it with its family's pretraining objective (causal LM) and saves it; lmforge loads the
saved dir and generates from it.  Parameter and FLOP counts follow the toy's own MLP.  A LoRA fine-tune of the
pretrained toy (its family's default targets) saves the adapter in PEFT's format, since the toy's names map to
transformers' through its family, and the adapter loads back onto the base.

The CLI runs in this process (``tests.conftest.cli``): a ``run_cli`` subprocess would not have the toy registered.
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge.core.config import load_config
from lmforge.delta import load_delta, read_delta_meta
from lmforge.eval.generate import generate_text
from lmforge.eval.sampling import GenerationConfig
from lmforge.models.flops import config_params, count_params
from lmforge.models.io import load_model
from lmforge.models.task import SequenceClassifier, ensure_pad_token
from lmforge.recipes.finetune import run_finetune
from lmforge.recipes.pretrain import PretrainConfig
from tests import toy_family
from tests.conftest import cli
from tests.smoke.test_cli import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_YAML = {"model": {"family": "toy", "vocab_size": 512, "d_model": 64, "n_layer": 2, "n_head": 2,
                      "n_kv_head": 1, "max_seq_len": 64}}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """`lmforge pretrain toy.yaml ...`: a few steps of the toy on the built-in world; its run dir."""
    root = tmp_path_factory.mktemp("toy")
    config = root / "toy.yaml"
    config.write_text(yaml.safe_dump(TOY_YAML))
    run_dir = root / "run"
    proc = cli("pretrain", str(config), f"run_dir={run_dir}", *TINY, "max_steps=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_model_family_toy_reads_as_the_toys_config(tmp_path):
    assert type(load_config(PretrainConfig, None, ["model.family=toy"]).model) is toy_family.ToyConfig
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(TOY_YAML))
    model = load_config(PretrainConfig, config).model
    assert type(model) is toy_family.ToyConfig and model.n_kv_head == 1


def test_toy_pretrains_saves_loads_and_generates(toy_run):
    rows = [json.loads(line) for line in (toy_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 12 and "val_loss" in rows[-1] and "val_ppl" in rows[-1]  # the causal LM's evaluator
    assert yaml.safe_load((toy_run / "config.yaml").read_text())["model"]["family"] == "toy"
    hf = json.loads((toy_run / "model" / "config.json").read_text())
    assert hf["model_type"] == "toy" and hf["architectures"] == ["ToyForCausalLM"]

    model, tokenizer = load_model(toy_run / "model")
    assert type(model) is toy_family.ToyLM and tokenizer is not None
    assert tokenizer.eos_id is not None  # the causal LM's default special tokens
    (result,) = generate_text(model, tokenizer, ["There once was a"], GenerationConfig(max_new_tokens=6))
    assert len(result.tokens) > 0 and isinstance(result.text, str)


def test_toy_parameter_count_follows_its_mlp():
    config = toy_family.ToyConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=32)
    model = toy_family.ToyLM(config)
    assert count_params(model) == config_params(config)
    assert count_params(model, non_embedding=False) == config_params(config, non_embedding=False)


def test_toy_lora_finetune_saves_a_peft_adapter_that_loads_back(toy_run, tmp_path):
    run = tmp_path / "ft"
    res = run_finetune(None, [f"run_dir={run}", f"model={toy_run / 'model'}", "task.name=world-sentiment",
                              "task.n_train=160", "task.n_val=32", "task.n_test=32", "peft.method=lora", "peft.r=4",
                              "max_steps=16", "train.global_batch_size=8", "train.eval_every=8", "train.ckpt_every=8",
                              "train.log_every=4", "train.warmup_steps=2", "train.lr=5e-3", "train.tensorboard=false",
                              "eval_batch_size=16"])
    assert res["family"] == "toy" and res["delta"]["method"] == "lora" and res["delta"]["merged"]
    assert res["delta"]["lora_layers"] == 4  # q_proj, v_proj (the toy's lora_targets) of 2 layers
    assert "accuracy" in json.loads((run / "results.json").read_text())["test"]
    # PEFT's format: the toy's family maps lmforge's names to transformers' (model.layers.{i}.self_attn.q_proj)
    pc = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert pc["peft_type"] == "LORA" and pc["task_type"] == "SEQ_CLS" and sorted(pc["target_modules"]) == \
        ["q_proj", "v_proj"] and pc["fan_in_fan_out"] is False
    keys = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "base_model.model.score.weight"} <= set(keys)

    merged, tokenizer = load_model(run / "model")  # the merged classifier, a plain model dir
    ids = torch.tensor([tokenizer.encode("The food was wonderful and the staff were kind.")])
    with torch.no_grad():
        want = merged.eval()(ids)
    base, base_tok = load_model(toy_run / "model")  # the base as fine-tuning saw it: a classifier with a pad token
    labels = read_delta_meta(run / "adapter")["id2label"]
    model = SequenceClassifier(base, [labels[str(i)] for i in range(len(labels))])
    ensure_pad_token(model, base_tok)
    load_delta(model, run / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), want, rtol=1e-5, atol=1e-5)
