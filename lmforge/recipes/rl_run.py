"""What `lmforge grpo` and `lmforge ppo` share: the prompts, the policy, the rewards, the held-out evaluation, the run.

Prompts (``data.train`` / ``data.eval``): ``world-instructions`` (the world's instruction records of
``data.types``, train split for training, validation for the held-out evaluation; their verifier fields come along)
or a .jsonl/.json/.csv/.parquet file whose records hold ``prompt`` (a string) or ``messages`` (a trailing assistant
message -- a reference answer -- is dropped) plus any fields the rewards read.  A prompt longer than
``rollout.max_prompt_length`` tokens is left out and counted (``prompts_too_long``).

Held-out evaluation every ``train.eval_every`` steps and once before training: greedy answers to the eval prompts,
the verifier's accuracy (``eval/accuracy``, when the records carry verifier fields) and the reward model's mean score
(``eval/reward_model``), with samples of answers in ``results.json``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lmforge.core.config import require, to_dict
from lmforge.core.device import resolve_device
from lmforge.core.seed import seed_everything
from lmforge.core.errors import ConfigError, DataError, ModelError
from lmforge.core.io import atomic_write_json
from lmforge.data.chat import ChatFormat
from lmforge.data.readers import read_records
from lmforge.data.world.instructions import build_instructions
from lmforge.data.world.verifiers import verify
from lmforge.delta import apply_delta, merge_delta, mergeable, save_delta
from lmforge.eval.generate import generate
from lmforge.eval.sampling import GenerationConfig, completion_batch
from lmforge.models.families import get_family
from lmforge.models.io import load_model, save_model
from lmforge.recipes.finetune import MUTABLE_KEYS, resolve_model_dir
from lmforge.recipes.sft import chat_format
from lmforge.rl.algos import evaluating
from lmforge.rl.rewards import RewardConfig, Rewards, Rollouts, check_verifier_fields
from lmforge.rl.rollouts import Prompt, RolloutSource
from lmforge.train.distributed import setup_distributed
from lmforge.train.rundir import check_run_dir, check_run_outputs
from lmforge.train.run import Evaluation, RunSpec
from lmforge.train.runlock import training_run
from lmforge.train.trainer import Trainer

WORLD = "world-instructions"


@dataclass
class PromptDataConfig:
    train: str = WORLD
    eval: Optional[str] = None
    """None: the world's validation split (with ``world-instructions``), else no held-out evaluation."""
    types: Optional[list[str]] = None
    """World instruction types (None: every type SFT saw)."""
    n_train: int = 64
    """World prompts per type for training."""
    n_eval: int = 16
    """World prompts per type for the held-out evaluation."""
    eval_max_new_tokens: int = 32

    def __post_init__(self) -> None:
        require(self.n_train >= 1, "data.n_train", self.n_train, ">= 1")
        require(self.n_eval >= 0, "data.n_eval", self.n_eval, ">= 0")


def load_policy(path: str) -> tuple[torch.nn.Module, Any, Path]:
    model_dir = resolve_model_dir(path)
    model, tokenizer = load_model(model_dir)
    if tokenizer is None:
        raise ModelError(f"'{path}' has no tokenizer.json; RL needs the policy's tokenizer saved with it")
    if get_family(model.config.family).kind != "decoder" or hasattr(model, "backbone"):
        raise ConfigError(f"'{path}' is not a decoder language model; RL trains decoders (the SFT model)")
    return model, tokenizer, model_dir


def _prompt_messages(record: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a prompt record must be an object with 'prompt' or 'messages'")
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: no 'prompt' string or 'messages' list; give one of them")
    if msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise DataError(f"{where}: 'messages' holds only an assistant reply; a prompt needs a user turn")
    return [dict(m) for m in msgs]


def _records(spec: str, split: str, cfg: PromptDataConfig, seed: int) -> tuple[list[dict[str, Any]], str]:
    if spec == WORLD:
        n = cfg.n_train if split == "train" else cfg.n_eval
        return build_instructions(split, n, seed=seed, types=cfg.types), f"{WORLD} ({split})"
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"data.{'train' if split == 'train' else 'eval'}='{spec}' is not a file nor {WORLD}")
    out = []
    for where, rec in read_records(path):
        rec = dict(rec) if isinstance(rec, dict) else rec
        if isinstance(rec, dict):
            rec["_where"] = str(where)
        _prompt_messages(rec, str(where))
        out.append(rec)
    return out, spec


def encode_prompts(records: list[dict[str, Any]], fmt: ChatFormat, limit: int, source: str
                   ) -> tuple[list[Prompt], int]:
    """Prompts in the chat format, those over ``limit`` tokens left out; returns ``(prompts, too_long)``."""
    prompts, too_long = [], 0
    for i, rec in enumerate(records):
        where = rec.get("_where", f"{source} record {i}")
        msgs = _prompt_messages(rec, where)
        ids = fmt.prompt_ids(msgs, where=where)
        if len(ids) > limit:
            too_long += 1
            continue
        text = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), msgs[-1]["content"])
        prompts.append(Prompt(ids, {k: v for k, v in rec.items() if k != "_where"}, text, msgs))
    return prompts, too_long


def load_prompts(data: PromptDataConfig, fmt: ChatFormat, limit: int, seed: int, needs_verifier: bool
                 ) -> tuple[list[Prompt], list[Prompt], dict[str, int]]:
    train_recs, train_src = _records(data.train, "train", data, seed)
    eval_spec = data.eval if data.eval is not None else (WORLD if data.train == WORLD else None)
    eval_recs, eval_src = _records(eval_spec, "validation", data, seed) if eval_spec else ([], "")
    if needs_verifier:
        check_verifier_fields(train_recs, train_src)
    train, long_train = encode_prompts(train_recs, fmt, limit, train_src)
    held, long_eval = encode_prompts(eval_recs, fmt, limit, eval_src)
    if not train:
        raise DataError(f"all {len(train_recs)} prompts of {train_src} are longer than rollout.max_prompt_length="
                        f"{limit} tokens ({long_train} too long); raise rollout.max_prompt_length or shorten them")
    if long_train:
        print(f"note: {long_train} of {len(train_recs)} training prompts are longer than "
              f"rollout.max_prompt_length={limit} tokens and were left out", file=sys.stderr, flush=True)
    return train, held, {"train": len(train), "eval": len(held), "prompts_too_long": long_train + long_eval}


def held_out_evaluator(prompts: list[Prompt], stop_ids: list[int], tokenizer: Any, max_new_tokens: int,
                       rewards: Rewards | None, pad_id: int, policy_of: Callable[[torch.nn.Module], torch.nn.Module],
                       samples: list[dict[str, Any]]) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """Greedy answers to the held-out prompts: verifier accuracy (records with verifier fields), the reward model's
    mean score; ``samples`` receives the first few answers of the latest call."""
    if not prompts:
        return None
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=stop_ids)
    checkable = all(p.record.get("answer") is not None and p.record.get("check") for p in prompts)
    models = [fn for _, fn in (rewards.items if rewards is not None else []) if hasattr(fn, "scores")]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        policy = policy_of(model)
        with evaluating(policy):
            results = generate(policy, [p.ids for p in prompts], cfg, tokenizer=tokenizer, pad_id=pad_id)
        out: dict[str, float] = {}
        answers = [r.text or "" for r in results]
        if checkable:
            right = [verify(p.record, a) for p, a in zip(prompts, answers)]
            out["eval/accuracy"] = sum(right) / len(right)
        if models:
            from_rows = _rows([p.ids for p in prompts], results, pad_id)
            r = Rollouts([p.record for p in prompts], [p.text for p in prompts], answers, *from_rows,
                         [p.messages for p in prompts])
            out["eval/reward_model"] = float(models[0].scores(r).mean())
        samples[:] = [{"prompt": p.text, "answer": a, **({"right": verify(p.record, a)} if checkable else {})}
                      for p, a in zip(prompts[:4], answers[:4])]
        return out

    return evaluate


def _rows(prompts: list[list[int]], results: list[Any], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = completion_batch(prompts, results, pad_id)
    return b["input_ids"], b["attention_mask"]


def save_policy(policy: torch.nn.Module, cfg: Any, delta: Any, model_dir: Path, tokenizer: Any,
                stop_ids: list[int], results: dict[str, Any]) -> None:
    """The trained policy as ``sft``/``dpo`` write it: a merged model dir (and the adapter of a delta method)."""
    run_dir = Path(cfg.run_dir)
    if delta is not None:
        adapter = save_delta(policy, run_dir / "adapter", cfg.peft, base_model=str(model_dir))
        results["delta"] = {"method": "+".join(delta.methods), "adapter_dir": str(adapter),
                            "merged": mergeable(policy)}
        if mergeable(policy):
            merge_delta(policy)
    if delta is None or results["delta"]["merged"]:
        save_model(policy, run_dir / "model", tokenizer=tokenizer, generation_config={"eos_token_id": stop_ids})
    else:
        tokenizer.save(run_dir / "adapter")


def finish(results: dict[str, Any], cfg: Any, t0: float) -> dict[str, Any]:
    results["train_s"] = time.perf_counter() - t0
    atomic_write_json(Path(cfg.run_dir) / "results.json", results)
    return results


__all__ = ["PromptDataConfig", "RewardConfig", "load_policy", "load_prompts", "held_out_evaluator", "save_policy",
           "finish"]


# ---- the run both recipes make ----------------------------------------------------------------------------------

@dataclass
class RLParts:
    """What a recipe's ``make_algo`` gets and fills: the policy (and for PPO its :class:`ActorCritic` as ``model``)."""

    cfg: Any
    policy: torch.nn.Module
    model: torch.nn.Module
    tokenizer: Any
    fmt: ChatFormat
    device: torch.device
    delta: Any
    reference_copy: torch.nn.Module | None
    stop_ids: list[int]


def train_rl(cfg: Any, name: str, wrap_model: Callable[[Any, torch.nn.Module], torch.nn.Module],
             make_algo: Callable[[RLParts], tuple[Any, Any]], wants_reference: bool, updates: int,
             minibatches: int, progress: bool | None = None) -> dict[str, Any]:
    """Load the policy, build prompts / rewards / rollouts / the algorithm, train with the Trainer, save, report."""
    t0 = time.perf_counter()
    dist, device_name = setup_distributed(cfg.distributed, cfg.train.device)
    if dist.enabled:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device_name))
        if dist.strategy == "fsdp":
            raise ConfigError(f"{name} runs with distributed.strategy=ddp (or none); fsdp is not supported by the RL "
                              f"loops yet")
    with training_run(cfg.run_dir) if dist.is_main else contextlib.nullcontext():
        dist.on_main(lambda: check_run_dir(cfg.run_dir, cfg.resume))
        dist.on_main(lambda: check_run_outputs(cfg.run_dir, cfg.overwrite))
        policy, tokenizer, model_dir = load_policy(cfg.model)
        seed_everything(cfg.seed)
        fmt, _ = chat_format(cfg.chat, policy, tokenizer)
        device = resolve_device(cfg.train.device)
        rewards = Rewards(cfg.rewards, tokenizer, device)
        # a prompt must leave room for the answer in the model's context
        room = policy.config.max_seq_len - max(cfg.rollout.max_new_tokens, cfg.data.eval_max_new_tokens)
        limit = min(cfg.rollout.max_prompt_length, room)
        train_prompts, eval_prompts, counts = load_prompts(cfg.data, fmt, limit, cfg.seed, rewards.uses_verifier)
        reference_copy = None
        if wants_reference and (cfg.reference == "copy" or (cfg.reference == "auto" and not cfg.peft.methods)):
            reference_copy = copy.deepcopy(policy).eval().requires_grad_(False).to(device)
        model = wrap_model(cfg, policy)
        delta = apply_delta(policy, cfg.peft, tokenizer)
        if delta is not None and dist.is_main:
            print(delta.line(), file=sys.stderr, flush=True)
        if wants_reference and reference_copy is None and delta is None:
            raise ConfigError(f"{name}.reference=disabled is the policy with its delta switched off, but no "
                              f"peft.method is set; use {name}.reference=copy, or train a delta")
        stop_ids = fmt.stop_ids()
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        parts = RLParts(cfg, policy, model, tokenizer, fmt, device, delta, reference_copy, stop_ids)
        algo, objective = make_algo(parts)
        source = RolloutSource(train_prompts, cfg.rollout, rewards, algo, seed=cfg.seed,
                               rows_per_step=cfg.train.global_batch_size, updates=updates, minibatches=minibatches,
                               stop_ids=stop_ids, pad_id=pad, tokenizer=tokenizer, rank=dist.rank,
                               world_size=dist.world_size)
        samples: list[dict[str, Any]] = []
        policy_of = (lambda m: m.policy) if model is not policy else (lambda m: m)
        evaluator = held_out_evaluator(eval_prompts, stop_ids, tokenizer, cfg.data.eval_max_new_tokens, rewards, pad,
                                       policy_of, samples)
        run = RunSpec(cfg.run_dir, cfg.max_steps, seed=cfg.seed, resume=cfg.resume, config_dict=to_dict(cfg),
                      mutable_keys=MUTABLE_KEYS)
        model.train()
        trainer = Trainer(model, objective, source, cfg.train, run,
                          Evaluation(evaluator, select_metric="eval/accuracy", select_mode="max", restore_best=False),
                          dist=dist, progress=progress)

        def rollout_generate(prompts, gen_cfg, *, num_samples, generator):
            inner = policy_of(trainer.model)
            with evaluating(inner), trainer._autocast():
                return generate(inner, prompts, gen_cfg, num_samples=num_samples, generator=generator,
                                tokenizer=tokenizer, pad_id=pad, grad_mode="no_grad")

        source.generate = rollout_generate
        # the starting model's held-out scores, kept in the run dir so a resumed run still reports them
        start_file = Path(cfg.run_dir) / "eval_start.json"
        if trainer.resuming and start_file.is_file():
            saved = json.loads(start_file.read_text(encoding="utf-8"))
            start, start_samples = saved["metrics"], saved["samples"]
        else:
            start = trainer.evaluate() if evaluator is not None else {}
            start_samples = list(samples)
            if dist.is_main:
                atomic_write_json(start_file, {"metrics": start, "samples": start_samples})
        fit = trainer.fit()
        final = trainer.export_model()
        results: dict[str, Any] = {"run_dir": str(cfg.run_dir), "model": str(model_dir), "algorithm": name,
                                   "prompts": counts, "start": start, "last": fit.final, "stop_ids": stop_ids,
                                   "samples": {"start": start_samples, "held_out": list(samples),
                                               "rollouts": source.samples}}
        if dist.is_main and final is not None:
            save_policy(policy_of(final).cpu(), cfg, delta, model_dir, tokenizer, stop_ids, results)
            finish(results, cfg, t0)
        dist.barrier()
        return results
