"""Runs under ``torchrun`` for tests/unit/test_distributed.py (and imported there for the 1-process reference).

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py parity OUT_DIR     (+ an fsdp run with checkpoints, the bf16 LoRA case)
    torchrun --standalone --nproc_per_node=N tests/dist_worker.py resume OUT_FILE fsdp=RUN_DIR zero1=RUN_DIR
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py generate OUT_DIR  (generation on the model being trained)
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py crash
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py nonfinite OUT_DIR   (rank 1's gradient alone is inf)

Tiny Llama (2 blocks, d=32, GQA, tied embeddings), variable-length right-padded batches of a learnable pattern, dropout 0, fp32,
global batch 8, 20 steps, grad clipping on.  Rank 0 writes what the test compares with ``torch.save``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.eval.sampling import GenerationConfig, SamplingRNG  # noqa: E402
from lmforge.objectives.causal_lm import CausalLMObjective  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.train.distributed import DistributedConfig, setup_distributed  # noqa: E402
from lmforge.core.errors import RunError  # noqa: E402
from lmforge.train import RunSpec, Trainer, TrainerConfig  # noqa: E402
from tests.unit.toy_training import poison_gradient  # noqa: E402

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


def make_model(meta: bool = False) -> DecoderLM:
    torch.manual_seed(0)
    if meta:  # fsdp ranks other than 0: no weights of their own (rank 0 broadcasts into the shards)
        with torch.device("meta"):
            return make_model()
    # Llama flavour (GQA, tied embeddings): GPT-2's key bias gets a gradient that is zero up to rounding (a
    # constant added to every score of a query), which Adam turns into lr-sized noise steps, so weights
    # would differ between any two summation orders, one process with and without accumulation included.
    model = DecoderLM(DecoderConfig(family="llama", vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, n_kv_head=1,
                                    max_seq_len=32, dropout=0.0, pad_token_id=0))
    # A trainable module the loss never reaches (as a fine-tuned BERT's pretraining heads): DDP must not wait
    # for its gradient, and a sharded checkpoint holds no optimizer state for it.
    model.unused_head = torch.nn.Linear(8, 3)
    return model


def train_cfg(micro, ckpt_every=0) -> TrainerConfig:
    return TrainerConfig(global_batch_size=BATCH, micro_batch_size=micro, lr=1e-2, warmup_steps=2, log_every=1,
                         ckpt_every=ckpt_every, keep_last=0, device="cpu", tensorboard=False, grad_clip=1.0,
                         fused_adamw="false")


def make_trainer(run_dir, micro, dist=None, max_steps=STEPS, ckpt_every=0, resume="auto") -> Trainer:
    objective = CausalLMObjective(pad_id=0)
    cfg = train_cfg(micro, ckpt_every)
    meta = dist is not None and dist.strategy == "fsdp" and not dist.is_main
    return Trainer(make_model(meta), objective, PatternSource(objective), cfg,
                   RunSpec(run_dir, max_steps, seed=3, resume=resume), progress=False, dist=dist)


def full_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trainer.model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def run_case(run_dir: Path, micro, dist=None, ckpt_every: int = 0) -> dict:
    """Step-1 gradients of a fresh trainer, then 20 steps: losses, final weights, per-rank bytes."""
    trainer = make_trainer(run_dir, micro, dist, ckpt_every=ckpt_every)
    buckets = [0]  # DDP gradient all-reduces (one per bucket): accumulation must not add any
    if dist is not None and dist.strategy == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            buckets[0] += 1
            return allreduce_hook(state, bucket)

        trainer.wrapped.register_comm_hook(None, counting_hook)
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
            "rank_memory": dict(trainer.rank_memory), "allreduce_buckets": buckets[0]}


def bf16_lora_case(out: Path, dist) -> None:
    """fsdp with bf16 compute: LoRA's A/B compute in fp32 (their own units), the frozen base in bf16, every master
    weight fp32; rank 0 saves what it saw to OUT/bf16_lora.pt."""
    from lmforge.delta import DeltaConfig, apply_delta

    model = make_model()
    apply_delta(model, DeltaConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]))
    seen: dict[str, str] = {}

    def record(name):
        def hook(module, args):
            w = module.weight
            seen[name] = str((w.to_local() if hasattr(w, "to_local") else w).dtype)
        return hook

    model.blocks[0].attn.q_proj.lora_A.register_forward_pre_hook(record("lora_A"))
    model.blocks[0].mlp.up_proj.register_forward_pre_hook(record("frozen_up_proj"))
    objective = CausalLMObjective(pad_id=0)
    trainer = Trainer(model, objective, PatternSource(objective), train_cfg(None),
                      RunSpec(out / "bf16-lora", 3, seed=3), progress=False, dist=dist)
    trainer.fit()
    masters = {n: str((p.to_local() if hasattr(p, "to_local") else p).dtype)
               for n, p in model.named_parameters()}
    exported = trainer.export_model()
    if dist.is_main:
        sd = exported.state_dict()
        torch.save({"compute": seen, "masters": masters, "losses": [trainer.last_metrics["loss"]],
                    "exported": {k: str(v.dtype) for k, v in sd.items()},
                    "lora_B_norm": float(sd["blocks.0.attn.q_proj.lora_B.weight"].norm())}, out / "bf16_lora.pt")


def nonfinite_case(run_dir: Path, dist, mode: str) -> dict:
    """6 steps where only rank 1's gradient is inf at step 3 (the loss stays finite): what this rank decided."""
    objective = CausalLMObjective(pad_id=0)
    source = PatternSource(objective)
    model = make_model(meta=dist.strategy == "fsdp" and not dist.is_main)
    if dist.rank == 1:
        poison_gradient(model.blocks[1], lambda: source.pos == 3)
    cfg = dataclasses.replace(train_cfg(None), nonfinite=mode)
    trainer = Trainer(model, objective, source, cfg, RunSpec(run_dir, 6, seed=3), progress=False, dist=dist)
    try:
        trainer.fit()
    except RunError as e:
        return {"error": str(e), "step": trainer.step}
    # ddp / zero1 replicate the weights: the ranks' sums agree bit for bit; fsdp: each rank's shard is finite
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    digest = (float(sum(p.detach().double().sum() for p in local)) if dist.strategy != "fsdp"
              else all(bool(p.isfinite().all()) for p in local))
    return {"skipped_steps": trainer.skipped_steps, "step": trainer.step, "weights": digest}


ROLLOUT_PROMPTS = {0: [[5, 9, 11, 3, 7, 30], [4, 8]], 1: [[12, 13, 14], [20, 21, 22, 23, 24], [6]]}
"""Each rank generates for prompts of its own (numbers and lengths differ), as RL ranks do."""


def generate_case(out: Path, dist) -> None:
    """Generation on the model being trained: greedy and sampled before the first step (FSDP's lazy init has not
    run), two training steps, greedy again; rank R writes what it generated and the final weights."""
    trainer = make_trainer(out / dist.strategy, None, dist, max_steps=2)
    prompts = ROLLOUT_PROMPTS[dist.rank]
    greedy = GenerationConfig(max_new_tokens=8, temperature=0.0, eos_token_id=7)
    found = {"before": trainer.generate(prompts, greedy, num_samples=2)}
    found["sampled"] = trainer.generate(prompts, GenerationConfig(max_new_tokens=6, temperature=1.0), num_samples=2,
                                        generator=SamplingRNG(seed=4, rank=dist.rank).generator())
    trainer.fit()
    found["after"] = trainer.generate(prompts, greedy, num_samples=2)
    found["losses"] = trainer.last_metrics.get("loss")
    model = trainer.export_model()
    if dist.is_main:
        found["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    found["results"] = {k: [dataclasses.asdict(r) for r in found[k]] for k in ("before", "sampled", "after")}
    torch.save({k: v for k, v in found.items() if k not in ("before", "sampled", "after")},
               out / f"{dist.strategy}-rank{dist.rank}.pt")


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
                # zero1 without accumulation also checkpoints (at 10 and 20): the resume test restarts it
                ckpt = 10 if (strategy, micro) == ("zero1", None) else 0
                results[(strategy, micro)] = run_case(out / f"{strategy}-{micro}", micro, dist, ckpt_every=ckpt)
        # 20 fsdp steps with a checkpoint every 10 (test_fsdp_checkpoint_resumes... resumes from step 10).
        ckpt_run = make_trainer(out / "fsdp-ckpt", None, dists[-1], ckpt_every=10)
        ckpt_run.fit()
        final = ckpt_run.export_model()
        if dists[0].is_main:
            results["fsdp-ckpt"] = {k: v.detach().clone() for k, v in final.state_dict().items()}
        dist, _ = setup_distributed(DistributedConfig(strategy="fsdp", param_dtype="bf16"))
        bf16_lora_case(out, dist)
        if dists[0].is_main:
            torch.save(results, out / "parity.pt")
        dists[0].close()
    elif mode == "resume":  # resume STRATEGY=RUN_DIR ... from their step-10 checkpoints; rank 0 writes OUT_FILE
        found, dists = {}, []
        for spec in argv[2:]:
            strategy, run_dir = spec.split("=", 1)
            dist, _ = setup_distributed(DistributedConfig(strategy=strategy))
            dists.append(dist)
            trainer = make_trainer(Path(run_dir), None, dist, ckpt_every=10, resume=True)
            trainer.fit()
            model = trainer.export_model()
            # the never-reached head had no AdamW state when saved, and must have none after the resume
            unused_state = (any(p in trainer.optimizer.state for p in trainer.model.unused_head.parameters())
                            if strategy == "fsdp" else None)
            if dist.is_main:
                found[strategy] = {"last_loss": trainer.last_metrics["loss"], "weights": model.state_dict(),
                                   "world_size": dist.world_size, "unused_state": unused_state}
        if dists[0].is_main:
            torch.save(found, argv[1])
        dists[0].close()
    elif mode == "nonfinite":  # every rank writes OUT_DIR/rankR.json: the test compares them
        out, found, dists = Path(argv[1]), {}, []
        for strategy, policy in (("ddp", "skip"), ("zero1", "skip"), ("fsdp", "skip"), ("ddp", "stop")):
            dist, _ = setup_distributed(DistributedConfig(strategy=strategy))
            dists.append(dist)
            found[f"{strategy}-{policy}"] = nonfinite_case(out / f"{strategy}-{policy}", dist, policy)
        (out / f"rank{dists[0].rank}.json").write_text(json.dumps(found, indent=1))
        dists[0].close()
    elif mode == "generate":  # generate OUT_DIR: ddp then fsdp, every rank writes OUT_DIR/STRATEGY-rankR.pt
        dists = []
        for strategy in ("ddp", "fsdp"):
            dist, _ = setup_distributed(DistributedConfig(strategy=strategy))
            dists.append(dist)
            generate_case(Path(argv[1]), dist)
        dists[0].close()
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
