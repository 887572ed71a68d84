"""`lmforge reward`: a pairwise reward model on preference pairs, from an (SFT) language model.

Wiring only: the language model becomes a :class:`~lmforge.models.task.SequenceClassifier` with one output (its
score at the last real token; a pad token distinct from EOS is added where the tokenizer has none), pairs are
rendered in the model's chat format (:mod:`lmforge.recipes.pairs`), the Bradley-Terry objective
(:mod:`lmforge.objectives.reward`) trains under the one Trainer with any delta method, and ``RUN_DIR/model`` is
transformers' ``…ForSequenceClassification`` with ``num_labels = 1`` (what TRL loads as a reward model).  After
training the held-out pairs are scored: accuracy per kind (ties count half) in ``results.json`` and on stdout.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lmforge.core.config import load_config, split_config_arg, to_dict
from lmforge.core.errors import ConfigError, ModelError
from lmforge.core.io import atomic_write_json
from lmforge.core.seed import seed_everything
from lmforge.data.chat import ChatFormat
from lmforge.data.examples import ExampleSource
from lmforge.delta import DeltaConfig, apply_delta, merge_delta, mergeable
from lmforge.models.families import get_family
from lmforge.models.hf_task import load_task_model
from lmforge.models.io import load_model, save_model
from lmforge.models.task import SequenceClassifier, ensure_pad_token
from lmforge.objectives.reward import PairwiseRewardObjective
from lmforge.recipes.finetune import MUTABLE_KEYS, resolve_model_dir
from lmforge.recipes.pairs import PairDataConfig, PairEncoder, by_prompt, encode_pairs, load_pairs, pair_accuracy, \
    score_pairs
from lmforge.recipes.sft import ChatConfig, chat_format
from lmforge.train.rundir import check_run_dir, check_run_outputs
from lmforge.train.run import Evaluation, RunSpec, check_run_keys
from lmforge.train.runlock import training_run
from lmforge.train.trainer import Trainer, TrainerConfig


@dataclass
class RewardSection:
    center_rewards_coefficient: Optional[float] = None
    """TRL's reward centring: λ·(r_c + r_r)² per pair keeps scores near 0 (e.g. 0.01); None: off."""


def reward_train_defaults() -> TrainerConfig:
    return TrainerConfig(global_batch_size=16, lr=1e-4, warmup_steps=10, weight_decay=0.0, schedule="linear",
                         min_lr_ratio=0.0, eval_every=50, ckpt_every=100, keep_last=1, log_every=10)


@dataclass
class RewardConfig:
    run_dir: str = "runs/reward"
    seed: int = 0
    max_steps: int = 200
    resume: Literal["auto", "true", "false"] = "false"
    overwrite: bool = False
    model: str = "runs/sft"
    """A decoder model dir or run dir (its ``model/``): usually the SFT model."""
    data: PairDataConfig = field(default_factory=PairDataConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    train: TrainerConfig = field(default_factory=reward_train_defaults)
    peft: DeltaConfig = field(default_factory=DeltaConfig)
    reward: RewardSection = field(default_factory=RewardSection)

    def __post_init__(self) -> None:
        check_run_keys(self)


def _scorer(objective: PairwiseRewardObjective, model: torch.nn.Module):
    return lambda batch: objective.scores(model, batch)


def held_out(objective: PairwiseRewardObjective, model: torch.nn.Module, examples: list[dict[str, Any]]
             ) -> dict[str, Any]:
    """Accuracy per kind on ``examples`` (eval mode; the training mode restored)."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        scores = score_pairs(_scorer(objective, model), objective.collate, examples, device)
    finally:
        model.train(was)
    return pair_accuracy(scores, examples)


def reward(cfg: RewardConfig, progress: bool | None = None) -> dict[str, Any]:
    with training_run(cfg.run_dir):
        t0 = time.perf_counter()
        check_run_dir(cfg.run_dir, cfg.resume)
        check_run_outputs(cfg.run_dir, cfg.overwrite)
        model_dir = resolve_model_dir(cfg.model)
        base, tokenizer = load_model(model_dir)
        if tokenizer is None:
            raise ModelError(f"'{cfg.model}' has no tokenizer.json; a reward model needs the tokenizer saved with it")
        if isinstance(base, SequenceClassifier) or get_family(base.config.family).kind != "decoder":
            raise ConfigError(f"'{cfg.model}' is not a decoder language model; a reward model starts from one (the "
                              f"SFT model)")
        seed_everything(cfg.seed)
        fmt, _ = chat_format(cfg.chat, base, tokenizer)
        model = SequenceClassifier(base, ["reward"], scalar=True)
        pad = ensure_pad_token(model, tokenizer)
        delta = apply_delta(model, cfg.peft, tokenizer)
        if delta is not None:
            if not mergeable(model):  # refused before training, not after it
                raise ConfigError(f"peft.method={cfg.peft.method} cannot be merged into the weights, and a reward "
                                  f"model is exported whole; use lora, bitfit or full fine-tuning")
            print(delta.line(), file=sys.stderr, flush=True)
        limit = base.config.max_seq_len
        max_len = cfg.data.max_length or limit
        if max_len > limit:
            raise ConfigError(f"data.max_length={max_len} exceeds the model's max_seq_len={limit}; lower it")
        examples, counts = encode_pairs(PairEncoder(fmt, max_len), load_pairs(cfg.data))
        objective = PairwiseRewardObjective(pad_id=pad, center_rewards_coefficient=cfg.reward.center_rewards_coefficient)
        source = ExampleSource(by_prompt(examples["train"]), objective.collate, seed=cfg.seed)
        val = examples["validation"]
        evaluation = Evaluation((lambda m: {"val_accuracy": held_out(objective, m, val)["all"]["accuracy"]})
                                if val else None, select_metric="val_accuracy", select_mode="max", restore_best=False)
        run = RunSpec(cfg.run_dir, cfg.max_steps, seed=cfg.seed, resume=cfg.resume, config_dict=to_dict(cfg),
                      mutable_keys=MUTABLE_KEYS)
        model.train()
        trainer = Trainer(model, objective, source, cfg.train, run, evaluation, progress=progress)
        fit = trainer.fit()
        final = trainer.export_model().cpu()
        test = held_out(objective, final, examples["test"]) if examples["test"] else {}
        results: dict[str, Any] = {"run_dir": str(cfg.run_dir), "model": str(model_dir), "last": fit.final,
                                   "data": counts, "test": test, "train_s": time.perf_counter() - t0}
        if delta is not None:
            results["delta"] = {"method": "+".join(delta.methods), "merged": True}
            merge_delta(final)
        save_model(final, Path(cfg.run_dir) / "model", tokenizer=tokenizer)
        atomic_write_json(Path(cfg.run_dir) / "results.json", results)
        return results


def run_reward(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    config_path, overrides = split_config_arg(config_path, overrides)
    return reward(load_config(RewardConfig, config_path, overrides))


def evaluate_reward(model: str, data: str = "world-preferences", max_length: int | None = None) -> dict[str, Any]:
    """`lmforge eval reward`: a reward model dir's accuracy on preference pairs (a file, or the world's held-out
    pairs), per kind where the data names kinds, and its mean scores of chosen and rejected answers."""
    model_dir = resolve_model_dir(model)
    try:
        scorer, tokenizer = load_task_model(model_dir)
    except ModelError as e:
        raise ModelError(f"'{model}' has no score head, so it is no reward model ({e}); train one with "
                         f"lmforge reward") from None
    if not getattr(scorer, "scalar", False):
        raise ModelError(f"'{model}' is a classifier with {scorer.num_labels} labels, not a reward model (one "
                         f"score, num_labels=1); train one with lmforge reward")
    if tokenizer is None or not tokenizer.chat_template:
        raise ModelError(f"'{model}' has no tokenizer with a chat_template; a reward model scores conversations in "
                         f"the chat format it was trained with")
    cfg = PairDataConfig(train=data, test=None if data == "world-preferences" else data)
    pairs = load_pairs(cfg)["test"]
    encoder = PairEncoder(ChatFormat(tokenizer), max_length or scorer.config.max_seq_len)
    examples = [e for e in (encoder.encode(p) for p in pairs) if e is not None]
    if not examples:
        raise ConfigError(f"no pair of '{data}' fits the model's {encoder.max_length} positions")
    objective = PairwiseRewardObjective(pad_id=scorer.config.pad_token_id or 0)
    scores = score_pairs(_scorer(objective, scorer), objective.collate, examples, next(scorer.parameters()).device)
    return {"model": str(model_dir), "data": data, "pairs": len(examples), "dropped": encoder.dropped,
            "truncated": encoder.truncated, "accuracy": pair_accuracy(scores, examples),
            "mean_chosen": sum(c for c, _ in scores) / len(scores),
            "mean_rejected": sum(r for _, r in scores) / len(scores)}
