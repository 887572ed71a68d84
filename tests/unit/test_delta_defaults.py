"""Which learning rate a fine-tuning run trains at: the user's ``train.lr`` (config file or command line) > the delta
method's default (``DeltaMethod.train_defaults``; a combination: the method with the smallest default lr) > full
fine-tuning's (``full_lr``, else ``finetune_train_defaults``'); ``lr_from`` says which."""

import pytest
import yaml

from lmforge.delta.registry import get_method, method_names
from lmforge.recipes.bench_peft import BenchPeftConfig, _method_lr
from lmforge.core.config import save_config, to_dict
from lmforge.core.errors import RunError
from lmforge.recipes.finetune import MUTABLE_KEYS, finetune_train_defaults, load_finetune_config
from lmforge.train.rundir import check_config_change
from tests.conftest import cli
from tests.faults import assert_refused, assert_unchanged, hashes

FULL = finetune_train_defaults().lr
BUILT_IN = ["lora", "dora", "adapter", "ladder", "prefix", "prompt", "bitfit", "modules"]  # (tests register more)
EXTRA = {"modules": ["peft.train_modules=[classifier]"]}  # what a method needs besides its name


def _load(*overrides, config=None):
    return load_finetune_config(str(config) if config else None, list(overrides))


@pytest.mark.parametrize("method", BUILT_IN)
def test_a_method_without_train_lr_trains_at_its_own_default(method):
    assert method in method_names()
    cfg = _load(f"peft.method={method}", *EXTRA.get(method, []))
    own = get_method(method).train_defaults
    if method == "modules":  # trains whole modules, as full fine-tuning does: full fine-tuning's rate
        assert own == {} and (cfg.train.lr, cfg.lr_from) == (FULL, "fine-tuning's default")
        return
    assert own["lr"] > FULL  # every method that trains a delta takes larger steps than full fine-tuning
    assert (cfg.train.lr, cfg.lr_from) == (own["lr"], f"{method}'s default")


def test_the_users_lr_wins_from_the_config_file_and_from_the_command_line(tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text("full_lr: 1.0e-3\ntrain:\n  lr: 2.0e-4\n", encoding="utf-8")
    cfg = _load("peft.method=lora", config=config)
    assert (cfg.train.lr, cfg.lr_from) == (2e-4, "train.lr")
    cfg = _load("peft.method=lora", "train.lr=3e-3", config=config)
    assert (cfg.train.lr, cfg.lr_from) == (3e-3, "train.lr")
    cfg = _load("train.lr=7e-4", config=config)  # full fine-tuning: train.lr beats full_lr too
    assert (cfg.train.lr, cfg.lr_from) == (7e-4, "train.lr")


def test_full_fine_tuning_takes_full_lr_else_the_recipes_default(tmp_path):
    assert (_load().train.lr, _load().lr_from) == (FULL, "fine-tuning's default")
    config = tmp_path / "ft.yaml"
    config.write_text("full_lr: 1.0e-3\n", encoding="utf-8")
    cfg = _load(config=config)
    assert (cfg.train.lr, cfg.lr_from) == (1e-3, "full_lr")
    # a method without an lr of its own falls back to full_lr; one with an lr ignores it
    cfg = _load("peft.method=modules", "peft.train_modules=[classifier]", config=config)
    assert (cfg.train.lr, cfg.lr_from) == (1e-3, "full_lr")
    cfg = _load("peft.method=lora", config=config)
    assert (cfg.train.lr, cfg.lr_from) == (get_method("lora").train_defaults["lr"], "lora's default")


@pytest.mark.parametrize("combo, lead", [("lora+bitfit", "lora"), ("bitfit+lora", "lora"), ("prompt+bitfit", "bitfit"),
                                         ("prefix+modules", "prefix")])
def test_a_combination_trains_at_the_smallest_of_its_methods_defaults(combo, lead):
    cfg = _load(f"peft.method={combo}", "peft.train_modules=[classifier]")
    rates = [get_method(m).train_defaults.get("lr") for m in combo.split("+")]
    assert cfg.train.lr == min(r for r in rates if r is not None) == get_method(lead).train_defaults["lr"]
    assert cfg.lr_from == f"{lead}'s default"


def test_other_train_defaults_apply_where_the_user_left_them_unset(tmp_path, monkeypatch):
    monkeypatch.setattr(get_method("bitfit"), "train_defaults", {"lr": 4e-3, "warmup_steps": 7, "weight_decay": 0.0})
    cfg = _load("peft.method=bitfit")
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay) == (4e-3, 7, 0.0)
    config = tmp_path / "ft.yaml"
    config.write_text("train:\n  warmup_steps: 3\n", encoding="utf-8")
    cfg = _load("peft.method=bitfit", "train.weight_decay=0.05", config=config)
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay) == (4e-3, 3, 0.05)
    assert _load().train.warmup_steps == finetune_train_defaults().warmup_steps  # full fine-tuning: untouched


def test_a_method_default_naming_no_train_key_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(get_method("bitfit"), "train_defaults", {"lr": 1e-2, "warmpu_steps": 7})
    proc = cli("finetune", f"run_dir={tmp_path / 'run'}", "peft.method=bitfit")
    assert_refused(proc, "bitfit's train defaults", "warmpu_steps")
    assert not (tmp_path / "run").exists()


def test_lr_from_is_written_by_lmforge_not_given(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    before = hashes(tmp_path)
    proc = cli("finetune", f"run_dir={tmp_path / 'run'}", "peft.method=lora", "lr_from=lora's default")
    assert_refused(proc, "lr_from", "set train.lr")
    assert_unchanged(before)


def test_bench_peft_leaves_an_unnamed_delta_method_at_its_default():
    bench = BenchPeftConfig(lr={"bitfit": 2e-2})
    assert _method_lr(bench, "lora", 1e-3) is None  # the run resolves lora's default itself
    assert (_method_lr(bench, "bitfit", 1e-3), _method_lr(bench, "full", 1e-3)) == (2e-2, 1e-3)
    assert _method_lr(BenchPeftConfig(delta_lr=3e-3), "lora", 1e-3) == 3e-3


def test_a_run_from_before_lr_from_resumes_but_not_at_another_lr(tmp_path):
    """full_lr and lr_from record where train.lr came from; train.lr itself is what resume compares."""
    cfg = _load("peft.method=lora")
    old = to_dict(cfg)
    del old["full_lr"], old["lr_from"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old), encoding="utf-8")
    check_config_change(tmp_path, to_dict(cfg), MUTABLE_KEYS)
    check_config_change(tmp_path, to_dict(_load("peft.method=lora", "train.lr=5e-3")), MUTABLE_KEYS)
    save_config(cfg, tmp_path / "config.yaml")
    with pytest.raises(RunError, match=r"config changed since the run started: train\.lr \("):
        check_config_change(tmp_path, to_dict(_load("peft.method=lora", "train.lr=1e-3")), MUTABLE_KEYS)
