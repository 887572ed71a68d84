"""`lmforge dpo`: learning from preference pairs directly, against a frozen reference (the DPO family).

Wiring only: pairs in the model's chat format (:mod:`lmforge.recipes.pairs`), the DPO-family objective
(:mod:`lmforge.objectives.preference`) under the one Trainer, full fine-tuning or any delta method, and a model dir
that transformers serves as trained (as ``lmforge sft`` writes it).  The reference (``dpo.reference``):

* ``copy`` -- a frozen copy of the starting model (full fine-tuning's default);
* ``disabled`` -- the policy itself with its delta switched off (:func:`lmforge.delta.delta_disabled`): no second
  copy of the base in memory (a delta method's default);
* ``precomputed`` -- the starting model's log-probs of every train and validation pair computed once before
  training and cached in ``RUN_DIR/reference_logps.pt`` (keyed by the data and the model): no reference forward
  while training, and none again on resume.

After training the held-out pairs are scored by the implicit reward β·log(π/π_ref) (accuracy per kind; ties, as at
step 0, count half).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lmforge.core.config import load_config, require, split_config_arg, to_dict
from lmforge.core.errors import ConfigError, ModelError
from lmforge.core.io import atomic_write_json
from lmforge.core.seed import seed_everything
from lmforge.data.examples import ExampleSource
from lmforge.delta import DeltaConfig, apply_delta, delta_disabled, merge_delta, mergeable, save_delta
from lmforge.models.families import get_family
from lmforge.models.io import load_model, save_model
from lmforge.objectives.logprobs import token_logprobs
from lmforge.objectives.preference import (LOSS_TYPES, REFERENCE_FREE, DisabledReference, FrozenReference,
                                           PrecomputedReference, PreferenceObjective, pair_rows)
from lmforge.recipes.finetune import MUTABLE_KEYS, resolve_model_dir
from lmforge.recipes.pairs import PairDataConfig, PairEncoder, encode_pairs, load_pairs, pair_accuracy, score_pairs
from lmforge.recipes.sft import ChatConfig, chat_format
from lmforge.train.rundir import check_run_dir, check_run_outputs
from lmforge.train.run import Evaluation, RunSpec, check_run_keys
from lmforge.train.runlock import training_run
from lmforge.train.trainer import Trainer, TrainerConfig

REFERENCES = ("auto", "copy", "disabled", "precomputed")
REFERENCE_FILE = "reference_logps.pt"


@dataclass
class DPOSection:
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """One or more of sigmoid (DPO), cdpo, robust, hinge, ipo, simpo, sft (RPO's NLL term), summed with weights."""
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    """ε of cdpo and robust (and simpo's smoothing)."""
    simpo_gamma: float = 0.5
    reference: str = "auto"
    """auto (disabled with a delta method, copy without), copy, disabled, precomputed."""
    reference_model: Optional[str] = None
    """A model dir (or run dir) to use as the frozen reference instead of the starting model (with dpo.reference
    auto or copy); its tokenizer must be the policy's (the log-prob ratio compares the same token ids)."""

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        require(all(t in LOSS_TYPES for t in self.loss_type), "dpo.loss_type", self.loss_type,
                f"one or more of {', '.join(LOSS_TYPES)}")
        require(self.reference in REFERENCES, "dpo.reference", self.reference, f"one of {', '.join(REFERENCES)}")


def dpo_train_defaults() -> TrainerConfig:
    return TrainerConfig(global_batch_size=16, lr=5e-5, warmup_steps=10, weight_decay=0.0, schedule="linear",
                         min_lr_ratio=0.0, eval_every=50, ckpt_every=100, keep_last=1, log_every=10)


@dataclass
class DPOConfig:
    run_dir: str = "runs/dpo"
    seed: int = 0
    max_steps: int = 200
    resume: Literal["auto", "true", "false"] = "false"
    overwrite: bool = False
    model: str = "runs/sft"
    """A decoder model dir or run dir (its ``model/``): usually the SFT model."""
    data: PairDataConfig = field(default_factory=PairDataConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    train: TrainerConfig = field(default_factory=dpo_train_defaults)
    peft: DeltaConfig = field(default_factory=DeltaConfig)
    dpo: DPOSection = field(default_factory=DPOSection)

    def __post_init__(self) -> None:
        check_run_keys(self)


def _fingerprint(model_dir: Path, examples: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        if (model_dir / name).is_file():
            h.update((model_dir / name).read_bytes())
    h.update(json.dumps([[e["chosen_ids"], e["rejected_ids"], e["chosen_mask"], e["rejected_mask"]]
                         for e in examples]).encode())
    return h.hexdigest()


@torch.no_grad()
def precompute_reference(run_dir: Path, model: torch.nn.Module, collate, examples: dict[str, list], model_dir: Path,
                         disable) -> int:
    """Reference log-probs of every train / validation / test pair, cached in RUN_DIR (reused when the data and
    the model are the same); returns the number of pairs computed (0 when read from the cache)."""
    path = run_dir / REFERENCE_FILE
    flat = [e for split in ("train", "validation", "test") for e in examples.get(split, [])]
    key = _fingerprint(model_dir, flat)
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key and len(cached["chosen"]) == len(flat):
            for e, c, r in zip(flat, cached["chosen"].tolist(), cached["rejected"].tolist()):
                e["ref_chosen_logps"], e["ref_rejected_logps"] = c, r
            return 0
    chosen, rejected = [], []
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    with disable(model):
        for k in range(0, len(flat), 32):
            batch = {n: v.to(device) for n, v in collate(flat[k:k + 32]).items()}
            c, r = token_logprobs(model, *pair_rows(batch)).sums.chunk(2)
            chosen += c.tolist()
            rejected += r.tolist()
    model.train(was)
    for e, c, r in zip(flat, chosen, rejected):
        e["ref_chosen_logps"], e["ref_rejected_logps"] = c, r
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "chosen": torch.tensor(chosen), "rejected": torch.tensor(rejected)}, tmp)
    tmp.replace(path)
    return len(flat)


def implicit_rewards(objective: PreferenceObjective, model: torch.nn.Module, examples: list[dict[str, Any]]
                     ) -> dict[str, Any]:
    """Held-out accuracy of the implicit reward per kind (ties half)."""
    def score(batch):
        (c, r), (nc, nr), ref = objective.pair_logps(model, batch)
        _, chosen, rejected = objective.per_pair(c, r, nc.to(c.dtype), nr.to(c.dtype), ref)
        return chosen, rejected

    was = model.training
    model.eval()
    try:
        scores = score_pairs(score, objective.collate, examples, next(model.parameters()).device)
    finally:
        model.train(was)
    return pair_accuracy(scores, examples)


def _reference(cfg: DPOConfig, model: torch.nn.Module, has_delta: bool, tokenizer):
    kind = cfg.dpo.reference
    if not set(cfg.dpo.loss_type) - REFERENCE_FREE:
        return None, "none"
    if kind == "auto":
        kind = "copy" if cfg.dpo.reference_model is not None or not has_delta else "disabled"
    if cfg.dpo.reference_model is not None and kind != "copy":
        raise ConfigError(f"dpo.reference_model is a frozen copy's model; it needs dpo.reference=copy (or auto), not "
                          f"{kind}")
    if kind == "disabled":
        if not has_delta:
            raise ConfigError("dpo.reference=disabled is the policy with its delta switched off, but no peft.method "
                              "is set; use dpo.reference=copy (or precomputed), or train a delta")
        return DisabledReference(lambda m: delta_disabled(m, cfg.peft)), kind
    if kind == "copy":
        if cfg.dpo.reference_model is not None:
            return FrozenReference(load_reference(cfg.dpo.reference_model, model, tokenizer).eval()), kind
        return FrozenReference(copy.deepcopy(model).eval()), kind
    return PrecomputedReference(), kind


def load_reference(spec: str, policy: torch.nn.Module, tokenizer) -> torch.nn.Module:
    """``dpo.reference_model``: a decoder whose tokenizer is the policy's, token for token, or one line saying what
    differs (a ratio of log-probs over different vocabularies compares unrelated tokens)."""
    ref_dir = resolve_model_dir(spec)
    ref, ref_tok = load_model(ref_dir)
    where = f"dpo.reference_model={spec}"
    if get_family(ref.config.family).kind != "decoder" or hasattr(ref, "backbone"):
        raise ConfigError(f"{where} is not a decoder language model; give the policy's own kind of model")
    if ref_tok is None:
        raise ModelError(f"{where} has no tokenizer.json; the reference's tokenizer must be checked against the "
                         f"policy's")
    if ref_tok.get_vocab() != tokenizer.get_vocab():
        ours, theirs = tokenizer.vocab_size, ref_tok.vocab_size
        raise ConfigError(f"{where}: its vocabulary ({theirs} tokens) is not the policy's ({ours} tokens"
                          f"{', the same size but other ids' if ours == theirs else ''}); use a reference trained "
                          f"with the policy's tokenizer (e.g. the SFT model the policy starts from)")
    if ref.config.vocab_size != policy.config.vocab_size:
        raise ConfigError(f"{where}: its embedding has {ref.config.vocab_size} rows, the policy's "
                          f"{policy.config.vocab_size}; use a reference with the policy's vocabulary")
    return ref


def dpo(cfg: DPOConfig, progress: bool | None = None) -> dict[str, Any]:
    with training_run(cfg.run_dir):
        t0 = time.perf_counter()
        check_run_dir(cfg.run_dir, cfg.resume)
        check_run_outputs(cfg.run_dir, cfg.overwrite)
        model_dir = resolve_model_dir(cfg.model)
        model, tokenizer = load_model(model_dir)
        if tokenizer is None:
            raise ModelError(f"'{cfg.model}' has no tokenizer.json; DPO needs the model's tokenizer saved with it")
        if get_family(model.config.family).kind != "decoder" or hasattr(model, "backbone"):
            raise ConfigError(f"'{cfg.model}' is not a decoder language model; DPO trains decoders (the SFT model)")
        seed_everything(cfg.seed)
        fmt, _ = chat_format(cfg.chat, model, tokenizer)
        limit = model.config.max_seq_len
        max_len = cfg.data.max_length or limit
        if max_len > limit:
            raise ConfigError(f"data.max_length={max_len} exceeds the model's max_seq_len={limit}; lower it")
        examples, counts = encode_pairs(PairEncoder(fmt, max_len), load_pairs(cfg.data))
        reference_copy = cfg.dpo.reference == "copy" or (cfg.dpo.reference == "auto" and (
            not cfg.peft.methods or cfg.dpo.reference_model is not None))
        reference, kind = (_reference(cfg, model, bool(cfg.peft.methods), tokenizer) if reference_copy
                           else (None, None))
        delta = apply_delta(model, cfg.peft, tokenizer)
        if delta is not None:
            print(delta.line(), file=sys.stderr, flush=True)
        if not reference_copy:
            reference, kind = _reference(cfg, model, delta is not None, tokenizer)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        objective = PreferenceObjective(cfg.dpo.loss_type, cfg.dpo.loss_weights, beta=cfg.dpo.beta,
                                        label_smoothing=cfg.dpo.label_smoothing, simpo_gamma=cfg.dpo.simpo_gamma,
                                        reference=reference, pad_id=pad)
        precomputed = None
        if isinstance(reference, PrecomputedReference):
            disable = (lambda m: delta_disabled(m, cfg.peft)) if delta is not None else (lambda m: torch.no_grad())
            precomputed = precompute_reference(Path(cfg.run_dir), model, objective.collate, examples, model_dir,
                                               disable)
        source = ExampleSource(examples["train"], objective.collate, seed=cfg.seed)
        val = examples["validation"]
        evaluation = Evaluation((lambda m: {"val_accuracy": implicit_rewards(objective, m, val)["all"]["accuracy"]})
                                if val else None, select_metric="val_accuracy", select_mode="max", restore_best=False)
        run = RunSpec(cfg.run_dir, cfg.max_steps, seed=cfg.seed, resume=cfg.resume, config_dict=to_dict(cfg),
                      mutable_keys=MUTABLE_KEYS)
        model.train()
        trainer = Trainer(model, objective, source, cfg.train, run, evaluation, progress=progress)
        fit = trainer.fit()
        test = implicit_rewards(objective, trainer.model, examples["test"]) if examples["test"] else {}
        results: dict[str, Any] = {"run_dir": str(cfg.run_dir), "model": str(model_dir), "last": fit.final,
                                   "data": counts, "test": test, "reference": kind,
                                   "reference_forwards": getattr(reference, "forwards", 0),
                                   "reference_precomputed": precomputed, "stop_ids": fmt.stop_ids(),
                                   "train_s": time.perf_counter() - t0}
        final = trainer.export_model().cpu()
        if delta is not None:
            adapter = save_delta(final, Path(cfg.run_dir) / "adapter", cfg.peft, base_model=str(model_dir))
            results["delta"] = {"method": "+".join(delta.methods), "adapter_dir": str(adapter),
                                "merged": mergeable(final)}
            if mergeable(final):
                merge_delta(final)
        if delta is None or results["delta"]["merged"]:
            save_model(final, Path(cfg.run_dir) / "model", tokenizer=tokenizer,
                       generation_config={"eos_token_id": fmt.stop_ids()})
        else:
            tokenizer.save(Path(cfg.run_dir) / "adapter")
        atomic_write_json(Path(cfg.run_dir) / "results.json", results)
        return results


def run_dpo(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    config_path, overrides = split_config_arg(config_path, overrides)
    return dpo(load_config(DPOConfig, config_path, overrides))
