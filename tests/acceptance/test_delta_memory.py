"""Delta tuning's memory claim on the README pipeline's pretrained GPT-2 and its world-sentiment task (issue 6):
counted training memory (parameters + gradients + AdamW state + saved activations, one micro-batch of 32) is lowest
for ladder side tuning, well below LoRA's, and highest for full fine-tuning.  Nothing is trained (seconds).
The methods' accuracy table over 3 seeds is `lmforge bench peft configs/bench-peft-gpt2.yaml` (and the BERT one),
recorded in benchmarks/RESULTS.md: hours of CPU, beyond this tier's budget."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("family", ["gpt2"])
def test_ladder_lowest_full_highest(pipeline_run, tmp_path, family):
    run_dir, _ = pipeline_run(family)
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_peft_memory.py"), "--finetune",
                           str(ROOT / "configs" / "finetune-gpt2-sentiment.yaml"), "--out", str(out),
                           f"model={run_dir / 'model'}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    print("\n" + proc.stdout)
    rows = json.loads(out.read_text())
    total = {m: r["total"] for m, r in rows.items()}
    assert set(total) >= {"full", "lora", "dora", "houlsby", "pfeiffer", "bitfit", "ladder", "prefix", "prompt"}
    assert min(total, key=total.get) == "ladder"
    assert max(total, key=total.get) == "full"
    assert total["lora"] >= 1.5 * total["ladder"]  # "well below LoRA's at the same batch"
