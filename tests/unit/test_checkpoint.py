"""Checkpoints (atomic, COMPLETE marker, retention, best) and run directories (resume rules, cut-back)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from lmforge.core.errors import RunError
from lmforge.core.seed import rng_state
from lmforge.train.checkpoint import (checkpoint_dir, latest_checkpoint, list_checkpoints, load_checkpoint,
                                      prune_checkpoints, read_best, save_checkpoint, write_best)
from lmforge.train.rundir import DEFAULT_MUTABLE_KEYS, cut_metrics, prepare_run_dir


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 11, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as GPT-2


def _save(run_dir, step, model=None):
    model = model or Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return save_checkpoint(run_dir, step, model=model, optimizer=opt, state={"rng": None},
                           trainer_state={"tokens": step * 10})


def test_round_trip_with_tied_weights_optimizer_and_numpy_state(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model.lm_head(model.norm(model.embed(torch.tensor([[1, 2, 3]])))).sum()
    loss.backward()
    opt.step()
    random.random()
    state = {"rng": rng_state(), "data": {"pos": np.int64(7), "order": np.arange(5, dtype=np.uint32)},
             "scheduler": {"last_step": 3}}
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, state=state, trainer_state={"tokens": 99})
    assert path.name == "step_0000003" and (path / "COMPLETE").is_file()
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "optimizer.pt", "state.pt",
                                                "trainer_state.json", "manifest.json", "COMPLETE"}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    torch.manual_seed(1)
    other = Tied()
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    loaded = load_checkpoint(path, model=other, optimizer=opt2)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert other.lm_head.weight is other.embed.weight  # still tied
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert loaded["step"] == 3 and loaded["tokens"] == 99 and loaded["scheduler"] == {"last_step": 3}
    assert loaded["data"]["pos"] == 7 and loaded["data"]["order"].dtype == np.uint32
    assert loaded["data"]["order"].tolist() == [0, 1, 2, 3, 4]
    np_state = loaded["rng"]["numpy"]
    assert isinstance(np_state[1], np.ndarray) and np.array_equal(np_state[1], state["rng"]["numpy"][1])


def test_only_complete_checkpoints_count(tmp_path):
    _save(tmp_path, 5)
    _save(tmp_path, 10)
    partial = checkpoint_dir(tmp_path, 15)
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"torn")
    (tmp_path / "checkpoints" / ".step_0000020.abc.tmp").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    with pytest.raises(RunError, match="COMPLETE"):
        load_checkpoint(partial, model=Tied())
    prune_checkpoints(tmp_path, keep_last=3)
    assert not (tmp_path / "checkpoints" / ".step_0000020.abc.tmp").exists()  # leftovers cleaned
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_keep_last_keeps_the_best_outside_the_count(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step)
    write_best(tmp_path, 2, 0.5)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert read_best(tmp_path) == {"step": 2, "val_loss": 0.5, "path": "step_0000002"}
    prune_checkpoints(tmp_path, keep_last=0)  # 0 = keep all
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]


def test_mismatched_model_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    from lmforge.core.errors import ModelError
    with pytest.raises(ModelError, match="does not match"):
        load_checkpoint(path, model=nn.Linear(3, 3))


# ---- run directories ------------------------------------------------------------------------------

CFG = {"run_dir": "x", "seed": 0, "max_steps": 10, "resume": "auto",
       "model": {"n_layer": 2}, "train": {"lr": 1e-3, "log_every": 10, "micro_batch_size": 4}}


def _with(**changes):
    cfg = json.loads(json.dumps(CFG))
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def test_fresh_run_dir_saves_config(tmp_path):
    run = tmp_path / "a" / "b"
    assert prepare_run_dir(run, CFG, "auto") is False
    assert yaml.safe_load((run / "config.yaml").read_text()) == CFG
    assert prepare_run_dir(tmp_path / "c", CFG, "false") is False


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunError) as e:
        prepare_run_dir(blocker / "run", CFG, "auto")
    assert "not writable" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RunError, match="is a file"):
        prepare_run_dir(blocker, CFG, "auto")


def test_existing_run_dir_without_resume_is_refused(tmp_path):
    prepare_run_dir(tmp_path, CFG, "auto")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    with pytest.raises(RunError) as e:
        prepare_run_dir(tmp_path, CFG, "false")
    assert str(e.value) == (f"run dir '{tmp_path}' already exists; pass resume=true to continue it or choose a "
                            f"new run_dir")


def test_resume_true_needs_a_complete_checkpoint(tmp_path):
    prepare_run_dir(tmp_path, CFG, "auto")
    with pytest.raises(RunError, match="no complete checkpoint"):
        prepare_run_dir(tmp_path, CFG, "true")
    _save(tmp_path, 4)
    assert prepare_run_dir(tmp_path, CFG, "true") is True
    assert prepare_run_dir(tmp_path, CFG, "auto") is True


def test_resume_refuses_changed_immutable_keys_by_name(tmp_path):
    prepare_run_dir(tmp_path, CFG, "auto")
    _save(tmp_path, 4)
    with pytest.raises(RunError) as e:
        prepare_run_dir(tmp_path, _with(model__n_layer=4, train__lr=2e-3), "true")
    msg = str(e.value)
    assert "model.n_layer (2 -> 4)" in msg and "train.lr" in msg and "\n" not in msg
    # mutable keys may change, and the new config is saved
    new = _with(max_steps=20, train__log_every=5, train__micro_batch_size=2, resume="true", run_dir="moved")
    assert prepare_run_dir(tmp_path, new, "true") is True
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["max_steps"] == 20
    # recipes can widen the mutable set
    assert prepare_run_dir(tmp_path, _with(model__n_layer=3, max_steps=20, train__log_every=5,
                                           train__micro_batch_size=2),
                           "true", mutable_keys=DEFAULT_MUTABLE_KEYS | {"model"}) is True


def test_a_run_that_failed_before_its_first_step_is_taken_over(tmp_path):
    """config.yaml alone (e.g. train.lr was refused at the first step, or the data failed to load): a plain re-run
    (resume=false) and resume=auto take the dir over, even with the corrected config; resume=true still refuses."""
    prepare_run_dir(tmp_path, CFG, "false")
    fixed = _with(train__lr=2e-3)
    assert prepare_run_dir(tmp_path, fixed, "false") is False
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == fixed
    assert prepare_run_dir(tmp_path, CFG, "auto") is False
    with pytest.raises(RunError, match="no complete checkpoint"):
        prepare_run_dir(tmp_path, CFG, "true")


def test_auto_restarts_a_run_that_never_checkpointed(tmp_path):
    prepare_run_dir(tmp_path, CFG, "auto")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    assert prepare_run_dir(tmp_path, CFG, "auto") is False
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_cut_metrics_drops_later_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 3, "loss": 1}\n{"step": 4, "lo')
    cut_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_resume_accepts_an_option_added_since_at_its_empty_default(tmp_path):
    # A run saved before lmforge grew train.param_lr resumes when the option is at its off value ({}),
    # and is still refused when the user sets it.
    prepare_run_dir(tmp_path, CFG, "auto")
    _save(tmp_path, 4)
    with pytest.raises(RunError, match=r"train.param_lr \('<unset>' -> \{'head': 0.001\}\)"):
        prepare_run_dir(tmp_path, _with(train__param_lr={"head": 1e-3}), "true")
    assert prepare_run_dir(tmp_path, _with(train__param_lr={}), "true") is True


def test_a_run_saved_before_txt_split_resumes_at_the_old_behaviour_only(tmp_path):
    """data.txt_split came later; runs saved without it split .txt files at blank lines (``paragraph``)."""
    from lmforge.core.config import to_dict
    from lmforge.recipes.pretrain import PretrainConfig
    from lmforge.train.rundir import DEFAULT_MUTABLE_KEYS, check_config_change

    now = to_dict(PretrainConfig())
    assert now["data"]["txt_split"] == "paragraph"
    old = to_dict(PretrainConfig())
    del old["data"]["txt_split"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old), encoding="utf-8")
    check_config_change(tmp_path, now, DEFAULT_MUTABLE_KEYS)  # no change: the old behaviour
    now["data"]["txt_split"] = "file"
    with pytest.raises(RunError, match=r"config changed since the run started: data\.txt_split \('<unset>' -> 'file'\)"):
        check_config_change(tmp_path, now, DEFAULT_MUTABLE_KEYS)
