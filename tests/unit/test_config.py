from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pytest

from lmforge.core.config import (SectionChoice, diff_configs, dump_yaml, load_config, parse_overrides, save_config,
                                 to_dict)
from lmforge.core.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    schedule: Literal["cosine", "linear"] = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    steps: int | None = None


@dataclass
class Outer:
    seed: int = 0
    resume: Literal["auto", "true", "false"] = "false"
    name: str = "x"
    train: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\ntrain:\n  lr: 0.1\n  schedule: linear\n")
    cfg = load_config(Outer, p, ["train.lr=3e-4", "resume=true", "train.betas=[0.8,0.9]"])
    assert cfg.seed == 3 and cfg.train.lr == pytest.approx(3e-4) and cfg.train.schedule == "linear"
    assert cfg.resume == "true" and cfg.train.betas == [0.8, 0.9]


def test_unknown_key_names_valid_keys_and_closest(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, ["train.lrr=1"])
    msg = str(e.value)
    assert "train.lrr" in msg and "did you mean 'lr'" in msg and "schedule" in msg and "\n" not in msg


def test_bad_value_types():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(Outer, None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        load_config(Outer, None, ["train.schedule=cosin"])
    with pytest.raises(ConfigError, match="seed"):
        load_config(Outer, None, ["seed=1.5"])


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("seed: 1\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(Outer, p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_roundtrip_and_diff(tmp_path):
    cfg = load_config(Outer, None, ["train.lr=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Outer, tmp_path / "config.yaml")
    assert again == cfg
    assert diff_configs(to_dict(cfg), to_dict(load_config(Outer, None, ["seed=2"]))) == ["seed", "train.lr"]
    assert "lr: 0.5" in dump_yaml(cfg)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_shipped_configs_parse():
    """Every YAML in configs/ builds its command's config (catches renamed keys early)."""
    from pathlib import Path

    from lmforge.apps.pipeline import load_pipeline_config
    from lmforge.recipes.finetune import FinetuneConfig
    from lmforge.recipes.pretrain import PretrainConfig

    from lmforge.recipes.bench_peft import BenchPeftConfig
    from lmforge.recipes.finetune import load_finetune_config
    from lmforge.recipes.scaling_sweep import ScalingSweepConfig
    from lmforge.recipes.w2s import load_w2s_config

    root = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(root.glob("*.yaml")):
        if path.name == "pipeline.yaml":
            cfg = load_pipeline_config(str(path), [])
        elif path.name.startswith("bench-peft-"):  # a benchmark: its fine-tuning config and overrides parse too
            bench = load_config(BenchPeftConfig, path)
            cfg = load_finetune_config(str(root.parent / bench.finetune), list(bench.overrides))
        elif path.name.startswith("scaling-"):  # a sweep: its own keys, and the pretraining config it runs
            sweep = load_config(ScalingSweepConfig, path)
            assert sweep.budgets, path
            cfg = load_config(PretrainConfig, root.parent / sweep.pretrain if not Path(sweep.pretrain).is_absolute()
                              else sweep.pretrain)
        elif path.name.startswith("w2s-"):
            load_w2s_config(str(path), [])
            continue
        else:
            cfg = load_config(FinetuneConfig if path.name.startswith("finetune-") else PretrainConfig, path)
        assert cfg.max_steps > 0, path
    assert load_pipeline_config(None, []) == load_pipeline_config(str(root / "pipeline.yaml"), [])


def test_partial_section_keeps_the_parents_defaults():
    """`train.lr=...` on a fine-tuning config changes lr only; the fine-tuning train defaults stay."""
    from lmforge.recipes.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, None, ["train.lr=5e-4"])
    assert cfg.train.lr == 5e-4 and cfg.train.schedule == FinetuneConfig().train.schedule == "linear"
    assert cfg.train.eval_every == FinetuneConfig().train.eval_every > 0


@dataclass
class DecA:
    family: Literal["gpt2", "llama"] = "gpt2"
    width: int = 8


@dataclass
class EncB:
    family: Literal["bert"] = "bert"
    layers: int = 2


@dataclass
class HasModel:
    model: DecA | EncB = field(default_factory=DecA)


def test_model_section_is_chosen_by_family():
    assert load_config(HasModel, None, ["model.width=4"]).model == DecA(width=4)
    assert load_config(HasModel, None, ["model.family=bert", "model.layers=3"]).model == EncB(layers=3)
    with pytest.raises(ConfigError, match="model.width"):
        load_config(HasModel, None, ["model.family=bert", "model.width=3"])
    with pytest.raises(ConfigError, match="did you mean 'bert'"):
        load_config(HasModel, None, ["model.family=bertt"])


class _Registry(SectionChoice):
    """A section chosen through a registry a higher layer owns (here a dict that grows after the field is declared)."""

    key, default = "family", "deca"
    known: dict[str, type] = {"deca": DecA}

    def resolve(self, tag):
        return self.known.get(tag)

    def names(self):
        return list(self.known)

    def classes(self):
        return list(dict.fromkeys(self.known.values()))


@dataclass
class HasChosenModel:
    model: Annotated[Any, _Registry()] = field(default_factory=DecA)


def test_model_section_is_chosen_by_a_resolver(monkeypatch):
    assert load_config(HasChosenModel, None, ["model.width=4"]).model == DecA(width=4)
    with pytest.raises(ConfigError, match=r"^config key 'model.family': 'bert' is not one of deca$"):
        load_config(HasChosenModel, None, ["model.family=bert"])
    monkeypatch.setitem(_Registry.known, "bert", EncB)  # registered later: now it reads
    assert load_config(HasChosenModel, None, ["model.family=bert", "model.layers=3"]).model == EncB(layers=3)
    with pytest.raises(ConfigError, match=r"^config key 'model': 3 is not a valid DecA \| EncB$"):
        load_config(HasChosenModel, None, ["model=3"])
