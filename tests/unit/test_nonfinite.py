"""Non-finite steps (issue 22, item 3): a step whose gradient norm is NaN or infinite (while the loss is finite)
is never applied; ``train.nonfinite=stop`` ends the run naming the step and the last good checkpoint, ``skip``
goes on within ``train.max_skipped_steps`` in a row; no checkpoint or exported model ever holds a non-finite
tensor.  The 2-rank case (one rank's gradient poisoned) is in tests/unit/test_distributed.py."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.core.errors import ModelError, RunError
from lmforge.delta import DeltaConfig, apply_delta, save_delta
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.io import save_model
from lmforge.train import Evaluation, RunSpec, Trainer
from lmforge.train.checkpoint import checkpoint_dir, last_good_checkpoint, list_checkpoints
from lmforge.train.logging import format_record
from tests.conftest import ROOT, cli
from tests.faults import assert_refused, assert_unchanged, hashes
from tests.unit.toy_training import PlainCLM, ToyLM, ToySource, make_cfg, poison_gradient, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def poisoned_trainer(tmp: Path, name: str, steps, max_steps: int = 8, value: float = math.inf, fail_at=None,
                     resume="auto", **cfg) -> Trainer:
    """A toy run whose gradient is ``value`` at ``steps`` (the source's position is the step being computed)."""
    torch.manual_seed(0)
    model, objective = ToyLM(), PlainCLM()
    source = ToySource(objective, fail_at=fail_at)
    poison_gradient(model.fc, lambda: source.pos in steps, value)
    return Trainer(model, objective, source, make_cfg(**cfg), RunSpec(tmp / name, max_steps, seed=1, resume=resume),
                   Evaluation(), progress=False)


def ckpt_state(run: Path, step: int) -> tuple[dict, dict, dict]:
    """(weights, optimizer state tensors, trainer_state.json) of a saved checkpoint."""
    d = checkpoint_dir(run, step)
    optim = torch.load(d / "optimizer.pt", weights_only=True)["state"]
    return (load_file(d / "model.safetensors"), {(i, k): v for i, s in optim.items() for k, v in s.items()},
            json.loads((d / "trainer_state.json").read_text()))


def assert_equal_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fused", ["true", "false"], ids=["fused-device-flag", "foreach-host-read"])
def test_stop_names_the_step_and_the_last_good_checkpoint(tmp_path, fused):
    trainer = poisoned_trainer(tmp_path, "stop", {5}, ckpt_every=2, log_every=10, fused_adamw=fused)
    with pytest.raises(RunError) as e:
        trainer.fit()
    msg = str(e.value)
    assert re.search(r"gradient norm is (inf|nan) at step 5 \(the loss was finite\)", msg), msg
    assert "step_0000004" in msg and "train.nonfinite=skip" in msg
    assert "\n" not in msg
    run = tmp_path / "stop"
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]  # the check at step 6 raised before saving
    # nothing was applied after step 4: not the bad step 5, not the finite step 6 before the check
    weights, _, _ = ckpt_state(run, 4)
    assert_equal_tensors({k: v.detach() for k, v in trainer.model.state_dict().items()}, weights)


@pytest.mark.parametrize("fused", ["true", "false"], ids=["fused-device-flag", "foreach-host-read"])
def test_skip_leaves_weights_and_optimizer_state_as_they_were(tmp_path, fused):
    trainer = poisoned_trainer(tmp_path, "skip", {5}, ckpt_every=1, keep_last=0, fused_adamw=fused,
                               nonfinite="skip", value=math.nan)
    assert trainer.fit().final["step"] == 8  # the run goes on
    run = tmp_path / "skip"
    w4, o4, _ = ckpt_state(run, 4)
    w5, o5, state5 = ckpt_state(run, 5)
    assert_equal_tensors(w4, w5)
    assert_equal_tensors(o4, o5)  # AdamW moments and step counts untouched
    assert state5["nonfinite"] == {"skipped_steps": [5], "consecutive": 1, "schedule_advanced": True}
    w6, _, state6 = ckpt_state(run, 6)
    assert not torch.equal(w6["fc.weight"], w5["fc.weight"]) and state6["nonfinite"]["consecutive"] == 0
    lines = read_metrics(run)
    assert [r["skipped_steps"] for r in lines] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert lines[4]["lr"] != lines[3]["lr"] and lines[4]["grad_norm"] == "nan"  # the schedule advanced
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert "skipped steps 1" in format_record(lines[5], 8) and "skipped" not in format_record(lines[3], 8)


def test_resume_across_skipped_steps_is_exact(tmp_path):
    """Skips at 4, 6 and 7 (two in a row across the checkpoint at 6): killed before step 8 and resumed == one run."""
    kw = dict(ckpt_every=3, nonfinite="skip", max_skipped_steps=2)
    full = poisoned_trainer(tmp_path, "full", {4, 6, 7}, max_steps=10, **kw)
    full.fit()
    killed = poisoned_trainer(tmp_path, "killed", {4, 6, 7}, max_steps=10, fail_at=8, **kw)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert ckpt_state(tmp_path / "killed", 6)[2]["nonfinite"]["consecutive"] == 1
    resumed = poisoned_trainer(tmp_path, "killed", {4, 6, 7}, max_steps=10, resume="true", **kw)
    resumed.fit()
    assert_equal_tensors(full.model.state_dict(), resumed.model.state_dict())
    strip = lambda lines: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in lines]  # noqa: E731
    assert json.dumps(strip(read_metrics(tmp_path / "killed"))) == json.dumps(strip(read_metrics(tmp_path / "full")))
    assert ckpt_state(tmp_path / "killed", 10)[2]["nonfinite"]["skipped_steps"] == [4, 6, 7]


def test_too_many_skips_in_a_row_stop_the_run(tmp_path):
    trainer = poisoned_trainer(tmp_path, "stuck", {3, 4, 5}, nonfinite="skip", max_skipped_steps=2, ckpt_every=2)
    with pytest.raises(RunError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "3 steps in a row up to step 5" in msg and "train.max_skipped_steps=2" in msg and "step_0000004" in msg
    apart = poisoned_trainer(tmp_path, "apart", {2, 4, 6}, nonfinite="skip", max_skipped_steps=1)
    assert apart.fit().final["skipped_steps"] == 3


def test_the_last_good_checkpoint_is_one_with_finite_weights(tmp_path):
    """A diverged checkpoint (as an earlier lmforge, without manifests, could save) is never named as the last good
    one, and a resume falls back past it."""
    run = tmp_path / "r"
    poisoned_trainer(tmp_path, "r", set(), max_steps=4, ckpt_every=2).fit()
    bad = checkpoint_dir(run, 4) / "model.safetensors"
    save_file({k: torch.full_like(v, math.nan) for k, v in load_file(bad).items()}, bad)
    (checkpoint_dir(run, 4) / "manifest.json").unlink()  # an older lmforge's checkpoint: only its contents tell
    assert last_good_checkpoint(run) == checkpoint_dir(run, 2)
    poisoned = poisoned_trainer(tmp_path, "r", {3}, max_steps=6, ckpt_every=2)
    with pytest.raises(RunError, match=r"at step 3 .*the last good checkpoint is .*step_0000002 "):
        poisoned.fit()  # resumed from step 2: step 4 was set aside


@pytest.mark.parametrize("where", ["weights", "optimizer"])
def test_a_nonfinite_state_is_never_checkpointed(tmp_path, where):
    trainer = poisoned_trainer(tmp_path, "r", set(), max_steps=2, ckpt_every=2)
    trainer.fit()
    run = tmp_path / "r"
    before = hashes(run)
    with torch.no_grad():
        if where == "weights":
            trainer.model.fc.weight[0, 0] = math.inf
        else:
            trainer.optimizer.state[trainer.model.fc.weight]["exp_avg_sq"][0, 0] = math.nan
    with pytest.raises(RunError) as e:
        trainer.save_checkpoint()
    name = "weight 'fc.weight'" if where == "weights" else "the optimizer state of 'fc.weight'"
    assert f"{name} holds NaN or infinite values at step 2" in str(e.value) and "step_0000002" in str(e.value)
    assert_unchanged(before)
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # no half-written temp dir


def _tiny_gpt2() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(DecoderConfig(family="gpt2", vocab_size=48, d_model=32, n_layer=2, n_head=4, d_ff=48,
                                   max_seq_len=32, eos_token_id=2, pad_token_id=0))


def test_an_export_of_a_nonfinite_model_is_refused(tmp_path):
    trainer = poisoned_trainer(tmp_path, "r", set(), max_steps=2)
    trainer.fit()
    with torch.no_grad():
        trainer.model.lm_head.weight[3, 1] = math.nan
    with pytest.raises(RunError, match=r"model's weight 'lm_head.weight' holds NaN .* after step 2; nothing was "
                                       r"exported and no good checkpoint"):
        trainer.export_model()
    model = _tiny_gpt2()
    with torch.no_grad():
        model.blocks[1].mlp.c_fc.weight[0, 0] = math.inf
    with pytest.raises(ModelError, match=r"weight 'blocks.1.mlp.c_fc.weight' of the model to save holds NaN"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_of_a_nonfinite_adapter_is_one_line_and_writes_nothing(tmp_path):
    base = save_model(_tiny_gpt2(), tmp_path / "base")
    model = _tiny_gpt2()
    cfg = DeltaConfig(method="lora", r=2, alpha=4)
    apply_delta(model, cfg)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("lora_B.weight")).fill_(math.nan)
    save_delta(model, tmp_path / "adapter", cfg)
    before = hashes(tmp_path)
    proc = cli("merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"))
    assert_refused(proc, "holds NaN or infinite values", "nothing was written")
    assert_unchanged(before)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("override, words", [("train.nonfinite=bogus", ["train.nonfinite", "bogus"]),
                                             ("train.max_skipped_steps=-1", ["train.max_skipped_steps", "-1"])])
def test_bad_nonfinite_keys_are_one_line(tmp_path, override, words):
    proc = cli("pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={tmp_path / 'r'}", override)
    assert_refused(proc, *words)
    assert not (tmp_path / "r").exists()
