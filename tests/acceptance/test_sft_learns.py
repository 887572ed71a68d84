"""SFT on the GPT-2 pipeline's pretrained model learns its chat turns: the supervised loss falls, validation loss
falls, and the model ends its turn with ChatML's ``<|im_end|>`` (added by ``lmforge sft``) on held-out questions.

Reuses the session's GPT-2 pipeline (``pipeline_run``), so it adds only the SFT run (~150 steps) and the checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.chat import ChatFormat
from lmforge.eval.generate import generate
from lmforge.eval.sampling import GenerationConfig
from lmforge.models.io import load_model
from lmforge.recipes.sft import SFTDataConfig, world_conversations
from tests.conftest import run_cli

STEPS = 150


def check_sft_learns(model: Path, run_dir: Path) -> dict:
    proc = run_cli("sft", f"model={model}", f"run_dir={run_dir}", f"max_steps={STEPS}", "data.n_train=1500",
                   "data.n_val=100", "train.eval_every=75", "train.log_every=25", "train.lr=3e-4", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["added_tokens"] and result["data"]["train"]["dropped"] == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert losses[-1] < 0.6 * losses[0], losses
    assert len(vals) >= 2 and vals[-1] < vals[0], vals

    chat_model, tok = load_model(run_dir / "model")
    fmt = ChatFormat(tok)
    eot = tok.token_to_id("<|im_end|>")
    assert fmt.stop_ids()[0] == eot
    questions = world_conversations("world-qa-closed", SFTDataConfig(n_train=1500, n_val=100))["validation"][:24]
    prompts = [fmt.prompt_ids(c.messages[:1]) for c in questions]
    results = generate(chat_model, prompts, GenerationConfig(max_new_tokens=24, eos_token_id=[eot]), tokenizer=tok)
    ended = sum(r.finish_reason == "eos" and r.tokens[-1] == eot for r in results)
    assert ended >= 0.9 * len(results), [r.text for r in results]
    return {"loss_first": losses[0], "loss_last": losses[-1], "val_first": vals[0], "val_last": vals[-1],
            "ended": ended, "asked": len(results)}


@pytest.mark.parametrize("family", ["gpt2"])
def test_sft_learns_to_answer_and_end_its_turn(pipeline_run, family, tmp_path):
    run_dir, _ = pipeline_run(family)
    check_sft_learns(run_dir, tmp_path / "sft")
