"""`lmforge sft`: supervised fine-tuning of a decoder on conversations, in its own chat format.

Wiring only: the chat format (the model's template, one given, or ChatML added — :mod:`lmforge.data.chat`), the
conversations (:mod:`lmforge.data.chat_data`, or a built-in world text-to-text task as one-turn chats), the SFT
objective (:mod:`lmforge.objectives.sft`: assistant tokens only, padded or packed), the one Trainer, and a model
dir that transformers serves as trained: the template in ``tokenizer_config.json``, ``generation_config.json``
stopping on the end-of-turn token.  Full fine-tuning or any delta method (``peft:``); tokens added for ChatML
train under a delta too (:mod:`lmforge.delta.token_rows`) and are baked into the exported model.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from tokenizers import AddedToken

from lmforge.core.config import load_config, require, split_config_arg, to_dict
from lmforge.core.errors import ConfigError, ModelError
from lmforge.core.io import atomic_write_json
from lmforge.core.seed import seed_everything
from lmforge.core.tokenizer import Tokenizer
from lmforge.data.chat import CHATML_END, CHATML_START, CHATML_TEMPLATE, ChatFormat
from lmforge.data.chat_data import FORMATS, Conversation, read_conversations
from lmforge.data.examples import ExampleSource
from lmforge.data.tasks import TaskConfig, load_task
from lmforge.data.world.instructions import build_instructions, split_types
from lmforge.delta import DeltaConfig, apply_delta, merge_delta, mergeable, save_delta
from lmforge.delta.token_rows import add_rows_to_peft_adapter, bake_token_rows, train_token_rows
from lmforge.models.families import get_family
from lmforge.models.io import load_model, save_model
from lmforge.models.task import resize_token_embeddings
from lmforge.objectives.sft import SFTObjective
from lmforge.recipes.finetune import MUTABLE_KEYS, resolve_model_dir
from lmforge.train.rundir import check_run_dir, check_run_outputs
from lmforge.train.run import Evaluation, RunSpec, check_run_keys
from lmforge.train.runlock import training_run
from lmforge.train.trainer import Trainer, TrainerConfig

WORLD_PREFIX = "world-"
WORLD_INSTRUCTIONS = "world-instructions"


@dataclass
class ChatConfig:
    template: Optional[str] = None
    """A ``.jinja`` file or the template text; None: the model's own ``chat_template``."""
    add_chatml: bool = True
    """A model without a template gets ChatML: ``<|im_start|>``/``<|im_end|>`` added as special tokens, embedding
    rows from the mean of the old ones, the template saved with the model.  False: such a model is refused."""


@dataclass
class SFTDataConfig:
    train: str = "world-qa-closed"
    """A .jsonl/.json/.csv/.parquet file or a datasets folder (``DIR::SPLIT``), a built-in world text-to-text
    task (``world-qa-closed``, ``world-qa-context``) as one-turn conversations, or ``world-instructions`` (the
    world's instruction tasks, :mod:`lmforge.data.world.instructions`; ``data.types`` picks them)."""
    validation: Optional[str] = None
    """The same kinds; None: a world task's validation split, else no validation."""
    format: str = "auto"
    """auto, messages, sharegpt, alpaca, prompt_completion (:mod:`lmforge.data.chat_data`)."""
    max_length: Optional[int] = None
    """Tokens per conversation (None: the model's max_seq_len); longer ones are cut after a whole assistant turn
    (counted as truncated) or dropped when none fits (counted)."""
    packing: bool = True
    """Several conversations per row (block-diagonal causal mask, positions restarted); false: one per row, padded."""
    n_train: int = 2000
    n_val: int = 200
    """World tasks: conversations per split (``world-instructions``: spread evenly over ``data.types``)."""
    types: Optional[list[str]] = None
    """``world-instructions``: the task types trained on (None: every type not held out —
    :data:`lmforge.data.world.instructions.HELD_OUT_TYPES` never are)."""

    def __post_init__(self) -> None:
        require(self.format in FORMATS, "data.format", self.format, f"one of {', '.join(FORMATS)}")
        require(self.max_length is None or self.max_length >= 2, "data.max_length", self.max_length, ">= 2")


def sft_train_defaults() -> TrainerConfig:
    return TrainerConfig(global_batch_size=16, lr=1e-4, warmup_steps=10, weight_decay=0.0, schedule="linear",
                         min_lr_ratio=0.0, eval_every=50, ckpt_every=100, keep_last=1, log_every=10)


@dataclass
class SFTConfig:
    run_dir: str = "runs/sft"
    seed: int = 0
    max_steps: int = 200
    resume: Literal["auto", "true", "false"] = "false"
    overwrite: bool = False
    model: str = "runs/pipeline"
    """A decoder model dir (HF checkpoint) or an lmforge run dir (its ``model/``)."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    train: TrainerConfig = field(default_factory=sft_train_defaults)
    peft: DeltaConfig = field(default_factory=DeltaConfig)

    def __post_init__(self) -> None:
        check_run_keys(self)


# ---- the chat format ------------------------------------------------------------------------------------
def add_chatml(model: torch.nn.Module, tokenizer: Tokenizer) -> list[int]:
    """Give ``tokenizer`` ChatML's tokens and template (in place) and ``model`` rows for them; returns the new ids.
    A tokenizer holding the strings as ordinary tokens cannot make them special: refused, naming chat_template."""
    new = [t for t in (CHATML_START, CHATML_END) if tokenizer.token_to_id(t) is None]
    plain = [t for t in (CHATML_START, CHATML_END) if t not in new and tokenizer.token_to_id(t) not in
             tokenizer.special_ids]
    if plain:
        raise ConfigError(f"the model has no chat_template and its tokenizer holds {plain[0]!r} as an ordinary token, "
                          f"so ChatML cannot be added; give a chat_template (chat.template=FILE)")
    hf = tokenizer.hf
    if new:
        hf = type(hf).from_str(hf.to_str())  # a copy: the old object may be shared
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    fresh = Tokenizer(hf, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                      unk_token=tokenizer.unk_token, mask_token=tokenizer.mask_token, cls_token=tokenizer.cls_token,
                      sep_token=tokenizer.sep_token, chat_template=CHATML_TEMPLATE,
                      model_max_length=tokenizer.model_max_length, guess_roles=False)
    tokenizer.__dict__.update(fresh.__dict__)
    ids = [tokenizer.token_to_id(t) for t in new]
    if max(ids, default=-1) >= model.config.vocab_size:
        resize_token_embeddings(model, tokenizer.vocab_size)
    return ids


def chat_format(cfg: ChatConfig, model: torch.nn.Module, tokenizer: Tokenizer) -> tuple[ChatFormat, list[int]]:
    """The run's chat format and the token ids it added (ChatML's, or none)."""
    if cfg.template is not None:
        p = Path(cfg.template)
        if p.suffix == ".jinja" and not p.is_file():
            raise ConfigError(f"chat.template='{cfg.template}' does not exist; give a .jinja file or the template text")
        tokenizer.chat_template = p.read_text(encoding="utf-8") if p.is_file() else cfg.template
        return ChatFormat(tokenizer), []
    if tokenizer.chat_template:
        return ChatFormat(tokenizer), []
    if not cfg.add_chatml:
        raise ConfigError("the model has no chat_template and chat.add_chatml=false; give one with "
                          "chat.template=FILE or let lmforge add ChatML (chat.add_chatml=true)")
    added = add_chatml(model, tokenizer)
    return ChatFormat(tokenizer), added


# ---- data -------------------------------------------------------------------------------------------------
def world_instruction_conversations(cfg: SFTDataConfig, seed: int = 0) -> dict[str, list[Conversation]]:
    """The world's instruction records (train and validation splits) as conversations, ``n_train`` / ``n_val``
    spread evenly over the chosen types.  The rude and evasive replies of :data:`RUDE_PHRASING` stay: the
    preference stages are what removes them."""
    types = cfg.types or split_types("train")
    out = {}
    for split, n in (("train", cfg.n_train), ("validation", cfg.n_val)):
        recs = build_instructions(split, -(-n // len(types)), seed=seed, types=types)[:n]
        out[split] = [Conversation(r["messages"], [1] * len(r["messages"]), f"{WORLD_INSTRUCTIONS}/{split}/{r['type']}")
                      for r in recs]
    return out


def world_conversations(name: str, cfg: SFTDataConfig) -> dict[str, list[Conversation]]:
    if name == WORLD_INSTRUCTIONS:
        return world_instruction_conversations(cfg)
    if cfg.types is not None:
        raise ConfigError(f"data.types is for data.train={WORLD_INSTRUCTIONS}, not {name}; drop it")
    task = load_task(TaskConfig(name=name, n_train=cfg.n_train, n_val=cfg.n_val, n_test=1))
    if task.type != "text2text":
        raise ConfigError(f"data.train={name}: SFT reads world text-to-text tasks (world-qa-closed, world-qa-context) "
                          f"as conversations, not a {task.type} task")
    return {split: [Conversation([{"role": "user", "content": r["input"]},
                                  {"role": "assistant", "content": r["target"]}], [1, 1], r.get("where", name))
                    for r in recs] for split, recs in task.splits.items()}


def load_conversations(cfg: SFTDataConfig) -> dict[str, list[Conversation]]:
    out: dict[str, list[Conversation]] = {}
    if cfg.train.startswith(WORLD_PREFIX) and not Path(cfg.train).exists():
        world = world_conversations(cfg.train, cfg)
        out = {"train": world["train"], "validation": world["validation"]}
    else:
        out["train"] = list(read_conversations(cfg.train, cfg.format))
    if cfg.validation is not None:
        out["validation"] = list(read_conversations(cfg.validation, cfg.format))
    out.setdefault("validation", [])
    return out


def encode_split(objective: SFTObjective, convs: list[Conversation]) -> tuple[list[Any], dict[str, int]]:
    t0, d0 = objective.truncated, objective.dropped
    examples = [e for e in (objective.encode(c) for c in convs) if e is not None]
    return examples, {"conversations": len(convs), "truncated": objective.truncated - t0,
                      "dropped": objective.dropped - d0}


# ---- the run ----------------------------------------------------------------------------------------------
@dataclass
class SFTParts:
    cfg: SFTConfig
    model: torch.nn.Module
    tokenizer: Tokenizer
    format: ChatFormat
    objective: SFTObjective
    examples: dict[str, list[Any]]
    counts: dict[str, dict[str, int]]
    added: list[int]
    delta: Any
    model_dir: str
    trainer: Trainer | None = None


def prepare(cfg: SFTConfig) -> SFTParts:
    """Model, chat format, delta and encoded data: everything but the Trainer (``inspect-data`` stops here)."""
    model_dir = resolve_model_dir(cfg.model)
    model, tokenizer = load_model(model_dir)
    if tokenizer is None:
        raise ModelError(f"'{cfg.model}' has no tokenizer.json; SFT needs the model's tokenizer saved with it")
    if get_family(model.config.family).kind != "decoder" or hasattr(model, "backbone"):
        raise ConfigError(f"'{cfg.model}' is not a decoder language model; SFT trains decoders (gpt2, llama)")
    seed_everything(cfg.seed)
    fmt, added = chat_format(cfg.chat, model, tokenizer)
    delta = apply_delta(model, cfg.peft, tokenizer)
    if delta is not None:
        if cfg.data.packing and ({"prompt", "prefix"} & set(cfg.peft.methods)):
            raise ConfigError(f"data.packing=true with peft.method={cfg.peft.method}: packed rows restart positions "
                              f"per conversation, which virtual tokens in front of the row cannot; set "
                              f"data.packing=false")
        train_token_rows(model, added)  # new special tokens learn under the delta too
        print(delta.line(), file=sys.stderr, flush=True)
    limit = model.config.max_seq_len
    max_len = cfg.data.max_length or limit
    if max_len > limit:
        raise ConfigError(f"data.max_length={max_len} exceeds the model's max_seq_len={limit}; lower it")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    objective = SFTObjective(fmt, max_len, pad, packing=cfg.data.packing)
    examples, counts = {}, {}
    for split, convs in load_conversations(cfg.data).items():
        examples[split], counts[split] = encode_split(objective, convs)
    for split, c in counts.items():  # cut or left-out conversations are said, never silent
        if c["truncated"] or c["dropped"]:
            print(f"note: {split}: {c['truncated']} of {c['conversations']} conversations cut after their last whole "
                  f"assistant turn within data.max_length={max_len}, {c['dropped']} dropped (no assistant turn "
                  f"fits, or every one has weight 0)", file=sys.stderr, flush=True)
    if not examples["train"]:
        raise ConfigError(f"no training conversation fits data.max_length={max_len} ({counts['train']['dropped']} "
                          f"dropped); raise data.max_length")
    return SFTParts(cfg, model, tokenizer, fmt, objective, examples, counts, added, delta, str(model_dir))


def validation_loss(objective: SFTObjective, examples: list[Any], model: torch.nn.Module,
                    batch_size: int = 32) -> dict[str, float]:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for k in range(0, len(examples), batch_size):
        batch = {n: v.to(device) for n, v in objective.collate(examples[k:k + batch_size]).items()}
        out = objective.loss(model, batch)
        total, count = total + float(out.loss_sum), count + int(out.count)
    return {"val_loss": total / max(count, 1)}


def build(cfg: SFTConfig, progress: bool | None = None) -> SFTParts:
    check_run_dir(cfg.run_dir, cfg.resume)
    check_run_outputs(cfg.run_dir, cfg.overwrite)
    parts = prepare(cfg)
    parts.model.train()
    source = ExampleSource(parts.examples["train"], parts.objective.collate, seed=cfg.seed)
    val = parts.examples["validation"]
    evaluation = Evaluation((lambda m: validation_loss(parts.objective, val, m)) if val else None,
                            select_metric="val_loss", select_mode="min", restore_best=False)
    run = RunSpec(cfg.run_dir, cfg.max_steps, seed=cfg.seed, resume=cfg.resume, config_dict=to_dict(cfg),
                  mutable_keys=MUTABLE_KEYS)
    parts.trainer = Trainer(parts.model, parts.objective, source, cfg.train, run, evaluation, progress=progress)
    return parts


def sft(cfg: SFTConfig, progress: bool | None = None) -> dict[str, Any]:
    """Train, then save ``RUN_DIR/model`` (merged for mergeable deltas; ``RUN_DIR/adapter`` beside it) and
    ``results.json``; return the results."""
    with training_run(cfg.run_dir):
        t0 = time.perf_counter()
        parts = build(cfg, progress)
        fit = parts.trainer.fit()
        model = parts.trainer.export_model().cpu()
        bake_token_rows(model)
        results: dict[str, Any] = {"run_dir": str(cfg.run_dir), "model": parts.model_dir, "last": fit.final,
                                   "data": parts.counts, "packing": cfg.data.packing, "masking": parts.format.masking,
                                   "added_tokens": parts.added, "stop_ids": parts.format.stop_ids(),
                                   "train_s": time.perf_counter() - t0}
        if parts.delta is not None:
            adapter = save_delta(model, Path(cfg.run_dir) / "adapter", cfg.peft, base_model=parts.model_dir)
            results["delta"] = {"method": "+".join(parts.delta.methods), "adapter_dir": str(adapter),
                                "merged": mergeable(model),
                                # the added tokens' trained rows, as PEFT's trainable_token_indices
                                "token_rows_in_adapter": add_rows_to_peft_adapter(model, adapter, parts.added)}
            if mergeable(model):
                merge_delta(model)
        if parts.delta is None or results["delta"]["merged"]:
            save_model(model, Path(cfg.run_dir) / "model", tokenizer=parts.tokenizer,
                       generation_config={"eos_token_id": parts.format.stop_ids()})
        else:
            parts.tokenizer.save(Path(cfg.run_dir) / "adapter")
        atomic_write_json(Path(cfg.run_dir) / "results.json", results)
        return results


def load_sft_config(config_path: str | None, overrides: list[str]) -> SFTConfig:
    config_path, overrides = split_config_arg(config_path, overrides)
    return load_config(SFTConfig, config_path, overrides)


def run_sft(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    return sft(load_sft_config(config_path, overrides))


def inspect_data(config_path: str | None, overrides: list[str], n: int = 3) -> dict[str, Any]:
    """The first ``n`` training conversations as rendered, supervised tokens marked, and the split counts."""
    parts = prepare(load_sft_config(config_path, overrides))
    tok = parts.tokenizer
    shown = []
    for ids, mask in parts.examples["train"][:n]:
        spans, cur, on = [], [], None
        for t, m in zip(ids, mask):
            if on is not None and bool(m) != on:
                spans.append((on, tok.decode(cur)))
                cur = []
            cur.append(t)
            on = bool(m)
        if cur:
            spans.append((on, tok.decode(cur)))
        rendered = "".join(f"[[{s}]]" if m else s for m, s in spans)
        shown.append({"tokens": len(ids), "supervised": int(sum(mask)), "rendered": rendered,
                      "supervised_text": [s for m, s in spans if m]})
    return {"examples": shown, "counts": parts.counts, "masking": parts.format.masking,
            "packing": parts.cfg.data.packing, "max_length": parts.objective.max_length,
            "added_tokens": [tok.id_to_token(i) for i in parts.added]}
