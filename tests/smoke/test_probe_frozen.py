"""benchmarks/probe_frozen.py: the linear probe separates what is separable, and the script runs end to end on a
tiny random GPT-2 (its figures on the pretrained models live in benchmarks/RESULTS.md)."""

import importlib.util
import subprocess
import sys

import torch

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("probe_frozen", ROOT / "benchmarks" / "probe_frozen.py")
probe_frozen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe_frozen)


def test_probe_separates_a_linear_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(400, 16, generator=g), torch.randn(200, 16, generator=g)
    w = torch.randn(16, generator=g)
    assert probe_frozen.probe(x, (x @ w > 0).long(), xt, (xt @ w > 0).long(), 2) >= 0.95
    noise = probe_frozen.probe(x, torch.randint(0, 2, (400,), generator=g), xt,
                               torch.randint(0, 2, (200,), generator=g), 2)
    assert 0.35 <= noise <= 0.65


def test_probe_script_on_a_tiny_model(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_peft_memory import _tiny_model
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    model = _tiny_model(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probe_frozen.py"), "--model", model,
                           "--n-train", "40", "--n-test", "20"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("majority 0.500 | probe on last token ")
    values = [float(part.split()[-1]) for part in last.split(" | ")]
    assert all(0.0 <= v <= 1.0 for v in values)
