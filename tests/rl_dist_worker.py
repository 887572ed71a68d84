"""Runs under ``torchrun`` for tests/unit/test_rl_dist.py (and imported there for the 1-process reference).

    torchrun --standalone --nproc_per_node=2 tests/rl_dist_worker.py dapo OUT_FILE MICRO   (fixed rollout batches)
    torchrun --standalone --nproc_per_node=2 tests/rl_dist_worker.py grpo OUT_DIR POLICY PROMPTS   (the recipe)

``dapo``: a tiny GPT-2 trained 4 steps with GRPO's ``dapo`` loss on fixed rollout-shaped batches (completions of
different lengths, so ranks' slices hold different token counts); rank 0 writes the final weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.objectives.rl import GRPOObjective, add_scales  # noqa: E402
from lmforge.train import RunSpec, Trainer, TrainerConfig  # noqa: E402
from lmforge.train.distributed import DistributedConfig, setup_distributed  # noqa: E402

V, ROWS, T = 48, 8, 14


class FixedRollouts:
    """Deterministic rollout batches per position: prompt 3..5 tokens, completion 1..8, old log-probs perturbed."""

    def __init__(self, objective: GRPOObjective) -> None:
        self.objective, self.pos = objective, 0

    def next_batch(self, n: int):
        rng = np.random.default_rng([7, self.pos])
        self.pos += 1
        ids = torch.tensor(rng.integers(3, V, size=(n, T)))
        mask, attn = torch.zeros(n, T, dtype=torch.bool), torch.zeros(n, T, dtype=torch.bool)
        for i in range(n):
            p, c = int(rng.integers(3, 6)), int(rng.integers(1, 9))
            mask[i, p:p + c], attn[i, :p + c] = True, True
        batch = {"input_ids": ids, "attention_mask": attn, "score_mask": mask,
                 "old_logps": torch.tensor(rng.normal(-3.8, 0.2, size=(n, T)), dtype=torch.float32) * mask,
                 "advantages": torch.tensor(rng.normal(size=n), dtype=torch.float32)}
        return add_scales(batch, self.objective.target_count(batch))

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = int(state["pos"])


def dapo_grads(run_dir: Path, micro: int | None, dist=None, loss_type: str = "dapo") -> dict[str, torch.Tensor]:
    """The first step's gradient (all-reduced across ranks) of a global batch split into micro-batches / ranks."""
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(family="gpt2", vocab_size=V, d_model=32, n_layer=2, n_head=4, max_seq_len=32,
                                    dropout=0.0))
    obj = GRPOObjective(loss_type=loss_type, eps_low=0.2, eps_high=0.28)
    cfg = TrainerConfig(global_batch_size=ROWS, micro_batch_size=micro, lr=1e-2, warmup_steps=0, log_every=1,
                        ckpt_every=0, device="cpu", tensorboard=False, fused_adamw="false", grad_clip=0.0)
    src = FixedRollouts(obj)
    trainer = Trainer(model, obj, src, cfg, RunSpec(run_dir, 1, seed=0, resume="false"), dist=dist, progress=False)
    trainer.compute_gradients(src.next_batch(ROWS))
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def dapo_run(run_dir: Path, micro: int | None, dist=None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(family="gpt2", vocab_size=V, d_model=32, n_layer=2, n_head=4, max_seq_len=32,
                                    dropout=0.0))
    obj = GRPOObjective(loss_type="dapo", eps_low=0.2, eps_high=0.28)
    cfg = TrainerConfig(global_batch_size=ROWS, micro_batch_size=micro, lr=1e-2, warmup_steps=0, log_every=1,
                        ckpt_every=0, device="cpu", tensorboard=False, fused_adamw="false", grad_clip=0.0)
    trainer = Trainer(model, obj, FixedRollouts(obj), cfg, RunSpec(run_dir, 4, seed=0, resume="false"), dist=dist,
                      progress=False)
    trainer.fit()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    mode = argv[0]
    dist, _ = setup_distributed(DistributedConfig(strategy="ddp"), "cpu")
    if mode == "dapo":
        out, micro = Path(argv[1]), int(argv[2])
        grads = dapo_grads(out.parent / "grads", micro, dist)
        weights = dapo_run(out.parent / "run", micro, dist)
        if dist.is_main:
            torch.save({"grads": grads, "weights": weights}, out)
    elif mode == "grpo":
        from lmforge.core.config import load_config
        from lmforge.recipes.grpo import GRPOConfig, grpo
        out, policy, prompts = argv[1:4]
        cfg = load_config(GRPOConfig, None, [
            f"model={policy}", f"run_dir={out}", f"data.train={prompts}", "rollout.max_new_tokens=6",
            "rollout.num_generations=4", "train.global_batch_size=8", "max_steps=3", "train.ckpt_every=0",
            "train.eval_every=0", "train.lr=1e-3", "train.tensorboard=false", "distributed.strategy=ddp",
            'rewards=[{kind: function, function: "tests.rl_rewards:digits"}]'])
        grpo(cfg, progress=False)
    dist.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
