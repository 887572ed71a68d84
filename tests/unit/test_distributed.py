"""Data parallelism on 2 gloo processes launched by torchrun: ddp, zero1 and fsdp equal one process.

The 1-process reference runs here; the 2-rank runs run under ``python -m torch.distributed.run`` (the
launcher users run) with tests/dist_worker.py.  Tolerances from the issue: per-step losses within 1e-5
relative, step-1 gradients rtol 1e-5, final weights per tensor ‖Δ‖/‖w‖ ≤ 1e-4, with and without accumulation.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.core.config import from_dict
from lmforge.core.errors import ConfigError, RunError
from lmforge.train.distributed import Dist, DistributedConfig, block_modules, setup_distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "dist_worker.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def _worker_module():
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _worker_module()


def torchrun(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def rel_weight_diff(a: dict, b: dict) -> dict[str, float]:
    assert set(a) == set(b)
    return {k: float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in b}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-parity")
    check_ok(torchrun(2, "parity", str(out)))
    results = torch.load(out / "parity.pt", weights_only=False)
    ref = {micro: W.run_case(out / f"ref-{micro}", micro) for micro in (None, 2)}
    return results, ref, out


@pytest.mark.parametrize("micro", [None, 2], ids=["no-accum", "accum-2"])
@pytest.mark.parametrize("strategy", ["ddp", "zero1", "fsdp"])
def test_two_ranks_equal_one_process(parity, strategy, micro):
    results, ref, _ = parity
    got, want = results[(strategy, micro)], ref[micro]
    assert len(got["losses"]) == len(want["losses"]) == W.STEPS
    for step, (a, b) in enumerate(zip(got["losses"], want["losses"]), 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} vs one process {b}"
    assert set(got["grads"]) == set(want["grads"])
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=f"step-1 gradient of {name}")
    worst = rel_weight_diff(got["weights"], want["weights"])
    bad = {k: v for k, v in worst.items() if v > 1e-4}
    assert not bad, f"final weights differ from one process: {bad}"
    # The losses moved: the run trained (a broken step that changes nothing would also 'match').
    assert want["losses"][-1] < want["losses"][0] - 0.5


def test_accumulation_all_reduces_once_per_step(parity):
    """ddp with 2 micro-batches per rank sends exactly as many gradient all-reduces as without accumulation
    (``no_sync`` on all but the last micro-batch); the count covers the step-1 gradients and 20 steps."""
    results = parity[0]
    plain, accum = results[("ddp", None)]["allreduce_buckets"], results[("ddp", 2)]["allreduce_buckets"]
    assert plain >= W.STEPS + 1  # at least one bucket per backward pass that syncs
    assert accum == plain


def test_fsdp_bf16_keeps_lora_in_fp32(parity):
    got = torch.load(parity[2] / "bf16_lora.pt", weights_only=False)
    assert got["compute"] == {"lora_A": "torch.float32", "frozen_up_proj": "torch.bfloat16"}
    assert set(got["masters"].values()) == {"torch.float32"}  # sharded master weights stay fp32
    assert set(got["exported"].values()) == {"torch.float32"} and any("lora_A" in k for k in got["exported"])
    assert got["lora_B_norm"] > 0  # B starts at zero: the exported copy holds the trained (gathered) values
    assert all(torch.isfinite(torch.tensor(x)) for x in got["losses"])


def test_per_rank_memory(parity):
    results, ref, _ = parity
    single = ref[None]["rank_memory"]
    ddp = results[("ddp", None)]["rank_memory"]
    zero1 = results[("zero1", None)]["rank_memory"]
    fsdp = results[("fsdp", None)]["rank_memory"]
    assert ddp == single  # ddp replicates everything
    model = W.make_model()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    adam_per_byte = single["optim_bytes"] / single["param_bytes"]  # exp_avg + exp_avg_sq (+ step scalars)
    assert zero1["param_bytes"] == ddp["param_bytes"]
    assert zero1["optim_bytes"] <= ddp["optim_bytes"] / 2 + adam_per_byte * largest / 2
    assert zero1["optim_bytes"] < 0.6 * ddp["optim_bytes"]
    assert abs(fsdp["param_bytes"] - ddp["param_bytes"] / 2) <= 0.02 * ddp["param_bytes"]
    assert abs(fsdp["optim_bytes"] - ddp["optim_bytes"] / 2) <= 0.02 * ddp["optim_bytes"]


def test_checkpoints_resume_on_one_and_two_ranks(parity, tmp_path):
    """fsdp (sharded dcp/) and zero1 (consolidated optimizer state) runs of 2 ranks, checkpointed at step 10,
    resume on 2 ranks and on 1 rank and end where the uninterrupted runs ended."""
    sources = {"fsdp": parity[2] / "fsdp-ckpt", "zero1": parity[2] / "zero1-None"}
    assert (sources["fsdp"] / "checkpoints" / "step_0000010" / "dcp" / ".metadata").is_file()
    assert (sources["zero1"] / "checkpoints" / "step_0000010" / "optimizer.pt").is_file()
    finals = {k: json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for k, d in sources.items()}
    assert all(f["step"] == W.STEPS for f in finals.values())
    keys = set(W.make_model().state_dict())
    weights = {}
    for nproc in (2, 1):
        specs = []
        for strategy, src in sources.items():
            run = tmp_path / f"{strategy}-{nproc}"
            shutil.copytree(src, run)
            shutil.rmtree(run / "checkpoints" / "step_0000020")  # as if killed after the step-10 checkpoint
            specs.append(f"{strategy}={run}")
        out = tmp_path / f"resume-{nproc}.pt"
        check_ok(torchrun(nproc, "resume", str(out), *specs))
        got = torch.load(out, weights_only=False)
        for strategy, final in finals.items():
            r = got[strategy]
            assert r["world_size"] == nproc
            if strategy == "fsdp":
                assert r["unused_state"] is False  # no placeholder AdamW state for a parameter that never had any
            assert abs(r["last_loss"] - final["loss"]) <= 1e-5 * abs(final["loss"]), (strategy, nproc, r, final)
            lines = [json.loads(x) for x in (tmp_path / f"{strategy}-{nproc}" / "metrics.jsonl").read_text().splitlines()]
            assert [x["step"] for x in lines] == list(range(1, W.STEPS + 1))  # steps 11-20 once, not twice
            assert set(r["weights"]) == keys
            weights[(strategy, nproc)] = r["weights"]
    for strategy in sources:
        bad = {k: v for k, v in rel_weight_diff(weights[(strategy, 1)], weights[(strategy, 2)]).items() if v > 1e-4}
        assert not bad, f"{strategy}: 1-rank and 2-rank resumes end at different weights: {bad}"
    uninterrupted = {"zero1": parity[0][("zero1", None)]["weights"], "fsdp": parity[0]["fsdp-ckpt"]}
    for strategy, want in uninterrupted.items():
        bad = {k: v for k, v in rel_weight_diff(weights[(strategy, 2)], want).items() if v > 1e-4}
        assert not bad, f"{strategy}: the resumed run ends at different weights than the uninterrupted one: {bad}"


def test_one_ranks_nonfinite_gradient_makes_every_rank_skip_or_stop(tmp_path):
    """Only rank 1's gradient is inf at step 3: the all-reduced norm is non-finite on both ranks, so under ddp,
    zero1 and fsdp both skip step 3 (and end with the same weights), and under stop both raise at step 3."""
    check_ok(torchrun(2, "nonfinite", str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    found = ranks[0]
    for strategy in ("ddp", "zero1", "fsdp"):
        case = found[f"{strategy}-skip"]
        assert case["skipped_steps"] == [3] and case["step"] == 6, (strategy, case)
        assert case["weights"] is True or math.isfinite(case["weights"]), (strategy, case)
    assert re.search(r"gradient norm is (inf|nan) at step 3 ", found["ddp-stop"]["error"]), found["ddp-stop"]
    assert found["ddp-stop"]["step"] == 3


def test_a_failing_rank_ends_the_job_and_is_named():
    proc = torchrun(2, "crash", timeout=240)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "simulated failure on rank 1" in text
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", text), text[-2000:]  # torchrun's summary names it


# ---- configuration errors (no processes needed) ------------------------------------------------------


def test_unknown_strategy_is_one_line():
    from lmforge.recipes.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match=r"distributed.strategy.*'zero3' is not one of .*did you mean 'zero1'"):
        from_dict(PretrainConfig, {"distributed": {"strategy": "zero3"}})
    with pytest.raises(ConfigError, match="distributed.strategy='zero3'"):
        DistributedConfig(strategy="zero3")


def test_global_batch_must_divide_by_world_size():
    d = Dist("ddp", rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"global_batch_size=7 is not divisible by the world size 2.*6 or 8"):
        d.check_batch(7, None)
    with pytest.raises(ConfigError, match="micro_batch_size=3 does not divide the 4 rows"):
        d.check_batch(8, 3)
    assert d.check_batch(8, 2) == 4


def test_shard_batch_takes_rank_slice():
    batch = {"input_ids": torch.arange(8).view(4, 2), "meta": "x", "names": list("abcd")}
    parts = [Dist("ddp", rank=r, world_size=2).shard_batch(batch, 4) for r in (0, 1)]
    assert parts[0]["input_ids"].tolist() == [[0, 1], [2, 3]] and parts[1]["names"] == ["c", "d"]
    assert parts[1]["meta"] == "x"


@pytest.mark.skipif(torch.cuda.is_available(), reason="nccl is available on this machine")
def test_unavailable_backend_is_one_line():
    with pytest.raises(ConfigError, match="distributed.backend=nccl is not available"):
        setup_distributed(DistributedConfig(strategy="ddp", backend="nccl"), "cpu")


def test_several_processes_need_a_strategy(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launched with 2 processes .* distributed.strategy=none"):
        setup_distributed(DistributedConfig(strategy="none"))


def test_single_process_commands_refuse_torchrun(monkeypatch):
    from lmforge.train.distributed import require_single_process

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"`lmforge pipeline` runs in one process.*WORLD_SIZE=2"):
        require_single_process("pipeline")


def test_fsdp_units_are_the_blocks():
    model = W.make_model()
    assert block_modules(model) == list(model.blocks)


def test_sharded_checkpoint_refused_without_fsdp(tmp_path):
    from lmforge.train.checkpoint import COMPLETE, load_checkpoint

    ckpt = tmp_path / "step_0000010"
    (ckpt / "dcp").mkdir(parents=True)
    (ckpt / COMPLETE).write_text("ok\n")
    with pytest.raises(RunError, match="sharded .* distributed.strategy=fsdp"):
        load_checkpoint(ckpt, model=W.make_model())


@pytest.mark.parametrize("strategy", ["zero1", "fsdp"])
def test_adafactor_is_refused_where_optimizer_state_is_sharded(strategy):
    """zero1 and fsdp shard AdamW's per-element state; Adafactor's factored rows/columns are not sharded by them."""
    from types import SimpleNamespace

    from lmforge.train.trainer import Trainer
    from lmforge.train.trainer_config import TrainerConfig

    trainer = SimpleNamespace(cfg=TrainerConfig(optimizer="adafactor"), dist=Dist(strategy, rank=0, world_size=2))
    with pytest.raises(ConfigError, match=rf"train.optimizer=adafactor .* strategy {strategy} shards AdamW state"):
        Trainer._build_optimizer(trainer)
