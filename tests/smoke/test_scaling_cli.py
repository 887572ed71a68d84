"""`lmforge scaling fit` / `scaling sweep` from the command line: --help, the JSON line, and the one-line errors."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, cli
from tests.smoke.test_cli import assert_clean_error

CHINCHILLA = ROOT / "tests" / "data" / "chinchilla_figure4_points.csv"


@pytest.mark.parametrize("cmd", [["scaling"], ["scaling", "sweep"], ["scaling", "fit"]])
def test_help(cmd):
    proc = cli(*cmd, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_fit_prints_the_fit_and_tokens_per_parameter_as_json(tmp_path):
    proc = cli("scaling", "fit", str(CHINCHILLA), "--approach", "3", "--drop-highest", "5", "--grid", "small",
               "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(out["approach3"]["params"]["E"] - 1.8172) < 0.01
    assert "tokens per parameter" in proc.stderr
    assert (tmp_path / "report.md").is_file() and (tmp_path / "frontier.png").is_file()


def test_fit_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("params,flop\n1,2\n")
    assert_clean_error(cli("scaling", "fit", str(bad)), "bad.csv:1", "lacks column(s) loss, D or C")
    assert_clean_error(cli("scaling", "fit", str(CHINCHILLA), "--approach", "2"), "approach 2", "three or more sizes")
    assert_clean_error(cli("scaling", "fit", str(tmp_path / "nope.csv")), "neither a CSV file nor")


def test_sweep_with_a_budget_too_small_is_one_line(tmp_path):
    proc = cli("scaling", "sweep", str(ROOT / "configs/scaling-world.yaml"), f"run_dir={tmp_path / 's'}",
               f"pretrain={ROOT / 'configs/tiny-gpt2.yaml'}", "budgets=[1e9,3e12]")
    assert_clean_error(proc, "budgets: 1e+09 FLOPs cannot fit the smallest model")
    assert not (tmp_path / "s").exists()  # refused before anything was written
