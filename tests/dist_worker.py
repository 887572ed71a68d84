"""Runs under ``torchrun`` for tests/unit/test_distributed.py (and imported there for the 1-process reference).

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py parity OUT_DIR
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py fsdp_ckpt OUT_DIR
    torchrun --standalone --nproc_per_node=N tests/dist_worker.py fsdp_resume RUN_DIR OUT_FILE
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py crash

Tiny Llama (2 blocks, d=32, GQA, tied embeddings), variable-length right-padded batches of a learnable pattern, dropout 0, fp32,
global batch 8, 20 steps, grad clipping on.  Rank 0 writes what the test compares with ``torch.save``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.data.objectives import CausalLMObjective  # noqa: E402
from lmforge.models.decoder import DecoderConfig, DecoderLM  # noqa: E402
from lmforge.train.distributed import DistributedConfig, setup_distributed  # noqa: E402
from lmforge.train.trainer import Trainer, TrainerConfig  # noqa: E402

VOCAB, STEPS, BATCH = 64, 20, 8


class PatternSource:
    """Deterministic per (seed, position): rows of ``start + k·stride mod V`` with lengths 4..16, right-padded,
    so ranks' slices hold different numbers of targets (the global-count normalisation is in play)."""

    def __init__(self, objective: CausalLMObjective, seed: int = 0) -> None:
        self.objective, self.seed, self.pos = objective, seed, 0

    def next_batch(self, n: int):
        rng = np.random.default_rng([self.seed, self.pos])
        self.pos += 1
        lengths = rng.integers(4, 17, size=n)
        seqs = [(rng.integers(2, VOCAB) + rng.integers(1, 4) * np.arange(k)) % VOCAB for k in lengths]
        return self.objective.collate(seqs)

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = int(state["pos"])


def make_model() -> DecoderLM:
    torch.manual_seed(0)
    # Llama flavour (GQA, tied embeddings): GPT-2's key bias gets a gradient that is zero up to rounding (a
    # constant added to every score of a query), which Adam turns into lr-sized noise steps, so weights
    # would differ between any two summation orders, one process with and without accumulation included.
    return DecoderLM(DecoderConfig(family="llama", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, n_kv_head=1,
                                   max_seq_len=32, dropout=0.0, pad_token_id=0))


def make_trainer(run_dir, micro, dist=None, max_steps=STEPS, ckpt_every=0, resume="auto") -> Trainer:
    objective = CausalLMObjective(pad_id=0)
    cfg = TrainerConfig(global_batch_size=BATCH, micro_batch_size=micro, lr=1e-2, warmup_steps=2, log_every=1,
                        ckpt_every=ckpt_every, keep_last=0, device="cpu", tensorboard=False, grad_clip=1.0,
                        fused_adamw="false")
    return Trainer(make_model(), objective, PatternSource(objective), cfg, run_dir=run_dir, max_steps=max_steps,
                   seed=3, resume=resume, progress=False, dist=dist)


def full_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def run_case(run_dir: Path, micro, dist=None) -> dict:
    """Step-1 gradients of a fresh trainer, then 20 steps: losses, final weights, per-rank bytes."""
    trainer = make_trainer(run_dir, micro, dist)
    trainer.compute_gradients(PatternSource(trainer.objective).next_batch(BATCH))
    grads = full_grads(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.fit()
    model = trainer.export_model()
    losses = None
    if model is not None:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines]
    return {"grads": grads, "losses": losses,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()} if model is not None else None,
            "rank_memory": dict(trainer.rank_memory)}


def main(argv: list[str]) -> int:
    mode = argv[0]
    torch.set_num_threads(1)
    if mode == "parity":
        out = Path(argv[1])
        results = {}
        dists = []
        for strategy in ("ddp", "zero1", "fsdp"):  # one process group (the first setup makes it), three strategies
            dist, _ = setup_distributed(DistributedConfig(strategy=strategy))
            dists.append(dist)
            for micro in (None, 2):
                results[(strategy, micro)] = run_case(out / f"{strategy}-{micro}", micro, dist)
        if dists[0].is_main:
            torch.save(results, out / "parity.pt")
        dists[0].close()
    elif mode == "fsdp_ckpt":  # 20 steps with a checkpoint every 10 (the test resumes from step 10)
        dist, _ = setup_distributed(DistributedConfig(strategy="fsdp"))
        make_trainer(Path(argv[1]), None, dist, ckpt_every=10).fit()
        dist.close()
    elif mode == "fsdp_resume":
        dist, _ = setup_distributed(DistributedConfig(strategy="fsdp"))
        trainer = make_trainer(Path(argv[1]), None, dist, ckpt_every=10, resume=True)
        trainer.fit()
        model = trainer.export_model()
        if dist.is_main:
            torch.save({"last_loss": trainer.last_metrics["loss"], "resumed_from": 10,
                        "weights": model.state_dict(), "world_size": dist.world_size}, argv[2])
        dist.close()
    elif mode == "crash":  # rank 1 fails while rank 0 waits in a collective: the job must end, naming rank 1
        dist, _ = setup_distributed(DistributedConfig(strategy="ddp", timeout_s=60))
        if dist.rank == 1:
            raise RuntimeError("simulated failure on rank 1")
        dist.barrier()
        dist.close()
    else:
        raise SystemExit(f"unknown mode {mode}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main(sys.argv[1:]))
