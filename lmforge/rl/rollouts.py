"""Rollouts: prompts → G answers each on the generation engine → rewards → the batch PPO / GRPO train on.

:class:`RolloutSource` is the Trainer's batch source of an RL run (the shape of ``tests/unit/test_rollout.py``'s
on-policy source).  Every ``updates`` Trainer steps it samples afresh: each rank takes its share of the step's prompts
(prompts split), generates ``G`` answers per prompt with the policy as it trains (one prefill, the sampling RNG a
checkpoint keeps), scores them (rewards; the policy's log-probs by a teacher-forced pass at the sampling temperature,
so the first update's ratio is 1; the reference's and the critic's where the algorithm needs them), and the ranks
gather the rows (rewards gathered), so advantages are computed on the whole global batch on every rank alike.  Then it
hands out the buffer: GRPO the whole batch ``μ`` times, PPO its minibatches in a fresh order each epoch.  The buffer,
the prompt position, the sampling RNG, the KL coefficient and the reward normalisation are its ``state_dict``: a
resumed run trains on exactly the rows an uninterrupted one did.

The one mask.  ``score_mask`` is True on each answer's real tokens, its EOS included and nothing after it; every
log-prob, KL, value, advantage and loss reads it (``mask_truncated_completions``: a length-cut answer's row is all
False: it takes no part in the loss).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as tdist

from lmforge.core.config import require
from lmforge.core.errors import ConfigError
from lmforge.eval.sampling import GenerationConfig, GenerationResult, SamplingRNG, completion_batch
from lmforge.rl.rewards import Rewards, Rollouts


@dataclass
class RolloutConfig:
    num_generations: int = 4
    """G: answers per prompt (GRPO needs >= 2: an advantage is relative to the group)."""
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    """Off by default: with top-k / top-p the sampled distribution is truncated and no training forward recomputes
    it, so the ratio of the first update is not 1 and the k1 KL can go negative (logged: rollout/logprob_gap)."""
    top_p: float = 1.0
    max_prompt_length: int = 256
    """Prompts with more tokens are left out (counted: prompts_too_long)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of an answer that never ended (cut at max_new_tokens)."""
    mask_truncated_completions: bool = False
    """Length-cut answers take no part in the loss."""

    def __post_init__(self) -> None:
        require(self.num_generations >= 1, "rollout.num_generations", self.num_generations, ">= 1")
        require(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, ">= 1")
        require(self.temperature > 0, "rollout.temperature", self.temperature,
                "> 0 (rollouts sample; greedy answers are the held-out evaluation's)")

    def generation(self, stop_ids: list[int]) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, eos_token_id=stop_ids)


@dataclass
class Prompt:
    ids: list[int]
    record: dict[str, Any]
    text: str
    messages: list[dict[str, Any]]


def pad_cat(parts: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate row dicts whose ``[R, L]`` entries have different widths (right padding: ids with ``pad_id``,
    everything else with 0/False)."""
    width = max(p["input_ids"].shape[1] for p in parts)
    out: dict[str, torch.Tensor] = {}
    for k in parts[0]:
        rows = []
        for p in parts:
            t = p[k]
            if t.dim() == 2 and t.shape[1] < width:
                fill = torch.full((t.shape[0], width - t.shape[1]), pad_id if k == "input_ids" else 0, dtype=t.dtype)
                t = torch.cat([t, fill], dim=1)
            rows.append(t)
        out[k] = torch.cat(rows)
    return out


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Each row's last True column (``[B]``; 0 for an empty row): where a sequence score goes, never a pad."""
    cols = torch.arange(mask.shape[1])
    return (cols * mask.long()).argmax(-1)


class RolloutSource:
    """The Trainer's source of an RL run.  ``algo`` is :class:`lmforge.rl.algos.GRPOAlgo` or ``PPOAlgo``: it scores
    a rank's rows (``score_local``) and turns the gathered global batch into training rows (``finish``)."""

    def __init__(self, prompts: list[Prompt], cfg: RolloutConfig, rewards: Rewards, algo: Any, *, seed: int,
                 rows_per_step: int, updates: int, minibatches: int, stop_ids: list[int], pad_id: int,
                 tokenizer: Any, rank: int = 0, world_size: int = 1) -> None:
        G = cfg.num_generations
        if rows_per_step % G:
            raise ConfigError(f"train.global_batch_size={rows_per_step} rows per update must be a multiple of "
                              f"rollout.num_generations={G}")
        self.rollout_rows = rows_per_step * minibatches
        self.n_prompts = self.rollout_rows // G
        if self.n_prompts % world_size:
            raise ConfigError(f"{self.n_prompts} prompts per rollout cannot be split over {world_size} ranks; make "
                              f"global_batch_size x minibatches / num_generations a multiple of the ranks")
        self.prompts, self.cfg, self.rewards, self.algo = prompts, cfg, rewards, algo
        self.seed, self.rows_per_step, self.updates, self.minibatches = seed, rows_per_step, updates, minibatches
        self.gen_cfg = cfg.generation(stop_ids)
        self.pad_id, self.tokenizer, self.rank, self.world_size = pad_id, tokenizer, rank, world_size
        self.rng = SamplingRNG(seed, rank)
        self.epoch, self.cursor, self.uses = 0, 0, 0
        self.buffer: dict[str, torch.Tensor] | None = None
        self.order: list[int] = []
        self.samples: list[dict[str, Any]] = []
        self.generate: Callable[..., list[GenerationResult]] | None = None  # set once the Trainer exists
        self._update_s, self._last_return = 0.0, None

    # ---- prompts ---------------------------------------------------------------------------------------------

    def _take_prompts(self) -> list[int]:
        """The rollout's prompt indices (the same on every rank): an epoch order seeded by (seed, epoch)."""
        out = []
        while len(out) < self.n_prompts:
            order = list(range(len(self.prompts)))
            random.Random(f"rl-prompts:{self.seed}:{self.epoch}").shuffle(order)
            take = order[self.cursor: self.cursor + self.n_prompts - len(out)]
            out += take
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    # ---- one rollout -----------------------------------------------------------------------------------------

    def _rollout(self) -> dict[str, torch.Tensor]:
        assert self.generate is not None, "RolloutSource.generate is set by the recipe once the Trainer exists"
        G = self.cfg.num_generations
        chosen = self._take_prompts()
        per = self.n_prompts // self.world_size
        mine = [self.prompts[i] for i in chosen[self.rank * per:(self.rank + 1) * per]]
        t0 = time.perf_counter()
        results = self.generate([p.ids for p in mine], self.gen_cfg, num_samples=G, generator=self.rng.generator())
        t1 = time.perf_counter()
        rows = completion_batch([p.ids for p in mine], results, self.pad_id, G)
        truncated = torch.tensor([r.finish_reason == "length" for r in results])
        answers = [r.text if r.text is not None else self.tokenizer.decode(r.tokens) for r in results]
        rep = [p for p in mine for _ in range(G)]
        rollouts = Rollouts([p.record for p in rep], [p.text for p in rep], answers, rows["input_ids"],
                            rows["attention_mask"], [p.messages for p in rep])
        scores = self.rewards(rollouts)
        parts = {f"reward/{k}": v for k, v in self.rewards.last.items()}
        penalised = scores - self.cfg.missing_eos_penalty * truncated.float()
        if self.cfg.mask_truncated_completions:
            rows["score_mask"] &= ~truncated[:, None]
        local = {**rows, "scores": penalised, "raw_scores": scores, "truncated": truncated,
                 "lengths": torch.tensor([len(r.tokens) for r in results], dtype=torch.float32),
                 # which rows share a prompt (its G answers; one id per prompt of the whole rollout) and its length:
                 # the update runs each prompt once (objectives.logprobs.shared_prompt_logprobs)
                 "group": torch.arange(len(results)) // G + self.rank * per,
                 "prompt_len": torch.tensor([len(p.ids) for p in rep]),
                 "gen_logps": self._gen_logps(rows, results), **parts}
        local.update(self.algo.score_local(local))
        t2 = time.perf_counter()
        if self.rank == 0 or self.world_size == 1:
            self.samples = [{"prompt": p.text, "answer": a, "reward": float(s), "finish": r.finish_reason}
                            for p, a, s, r in zip(rep[:: max(G, 1)], answers[:: max(G, 1)], scores[:: max(G, 1)],
                                                  results[:: max(G, 1)])][:4]
        batch = self._gather(local)
        batch = self.algo.finish(batch, G)
        times = {"time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": self._update_s}
        self._update_s = 0.0
        for k, v in times.items():
            batch[f"stat/{k}"] = torch.full((batch["input_ids"].shape[0],), float(v))
        return batch

    def _gen_logps(self, rows: dict[str, torch.Tensor], results: Sequence[GenerationResult]) -> torch.Tensor:
        """The engine's log-probs aligned like the teacher-forced ones (for the on-policy gap the logs show)."""
        out = torch.zeros(rows["input_ids"].shape, dtype=torch.float32)
        for i, r in enumerate(results):
            cols = rows["score_mask"][i].nonzero().flatten() if len(r.tokens) else torch.zeros(0, dtype=torch.long)
            if len(cols) == len(r.logprobs):
                out[i, cols] = torch.tensor(r.logprobs, dtype=torch.float32)
        return out

    def _gather(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.world_size == 1:
            return local
        parts: list[Any] = [None] * self.world_size
        tdist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
        return pad_cat(parts, self.pad_id)

    # ---- the Trainer's source interface ----------------------------------------------------------------------

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        if n != self.rows_per_step:
            raise ConfigError(f"the rollout source makes {self.rows_per_step} rows per update, asked for {n}")
        now = time.perf_counter()
        if self._last_return is not None:
            self._update_s += now - self._last_return
        if self.buffer is None or self.uses >= self.updates * self.minibatches:
            self.buffer, self.uses = self._rollout(), 0
        k = self.uses % self.minibatches
        if k == 0:  # a fresh minibatch order each epoch over the buffer
            order = list(range(self.rollout_rows))
            if self.minibatches > 1:
                random.Random(f"rl-minibatch:{self.seed}:{self.rng.calls}:{self.uses}").shuffle(order)
            self.order = order
        self.uses += 1
        idx = torch.tensor(self.order[k * n:(k + 1) * n])
        batch = {key: v[idx] for key, v in self.buffer.items()}
        batch = self.algo.scaled(batch)
        self._last_return = time.perf_counter()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"sampling": self.rng.state_dict(), "epoch": self.epoch, "cursor": self.cursor, "uses": self.uses,
                "order": list(self.order), "buffer": self.buffer, "rewards": self.rewards.state_dict(),
                "algo": self.algo.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.load_state_dict(state["sampling"])
        self.epoch, self.cursor, self.uses = int(state["epoch"]), int(state["cursor"]), int(state["uses"])
        self.order = [int(i) for i in state["order"]]
        self.buffer = state["buffer"]
        self.rewards.load_state_dict(state["rewards"])
        self.algo.load_state_dict(state["algo"])


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
