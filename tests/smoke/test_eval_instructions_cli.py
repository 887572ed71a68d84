"""`lmforge eval instructions` from the command line: its JSON and table, and its one-line refusals."""

import json

import pytest

from lmforge.data.world.instructions import HELD_OUT_TYPES, INSTRUCTION_TYPES
from tests.conftest import cli
from tests.faults import assert_refused
from tests.sft_models import tiny_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "m")


def test_json_has_every_split_type_and_column_and_the_table_the_same_numbers(model):
    proc = cli("eval", "instructions", "--model", str(model), "--base", str(model), "--n", "1", "--shots", "1",
               "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["columns"] == ["sft", "base_zero", "base_few", "base_likelihood"]
    held = [r["type"] for r in out["rows"] if r["split"] == "test_types"]
    assert held == [t for t in INSTRUCTION_TYPES if t in HELD_OUT_TYPES]
    assert {r["type"] for r in out["rows"] if r["split"] == "test_entities"} == set(INSTRUCTION_TYPES) - set(held)
    # the tiny model's 128 positions leave some long prompts out: counted, never scored as wrong
    scored = [r for r in out["rows"] if r["sft"] is not None]
    assert scored and out["skipped"]["sft"] == sum(r["n"] for r in out["rows"] if r["sft"] is None)
    table = cli("eval", "instructions", "--model", str(model), "--n", "1")
    assert table.returncode == 0 and "| split | kind | types | SFT model, zero-shot |" in table.stdout
    assert "FLAN" in table.stdout


def test_refusals_are_one_line(model, tmp_path):
    assert_refused(cli("eval", "instructions", "--model", str(tmp_path / "nope")), "nope")
    assert_refused(cli("eval", "instructions", "--model", str(model), "--n", "0"), "--n")
