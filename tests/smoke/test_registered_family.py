"""A family registered from outside lmforge (tests/toy_family.py's ``toy``) goes through the layers above models
as the built-in ones do: `lmforge pretrain` reads ``model.family: toy`` (YAML and overrides) as the toy's config,
builds its model, trains it with its family's pretraining objective (causal LM) and saves it; lmforge loads the
saved dir and generates from it.  Parameter and FLOP counts follow the toy's own MLP.

The CLI runs in this process (``tests.conftest.cli``): a ``run_cli`` subprocess would not have the toy registered.
Later stages (a LoRA fine-tune of the toy) build on the ``toy_run`` fixture."""

import json

import pytest
import yaml

from lmforge.core.config import load_config
from lmforge.eval.generate import generate_text
from lmforge.eval.sampling import GenerationConfig
from lmforge.models.flops import config_params, count_params
from lmforge.models.io import load_model
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
