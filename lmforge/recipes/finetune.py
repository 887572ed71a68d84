"""`lmforge finetune`: adapt a pretrained model (lmforge run or HF checkpoint dir) of any family to a task.

What each family does with each task type (``task.type``), as the family registry's plans say
(``Family.plan``; a registered family brings its own):

=================  ============================  ==========================  =========================
family             classification                token_classification        text2text
=================  ============================  ==========================  =========================
bert               pooled [CLS] -> linear        per-token linear            refused (no decoder)
gpt2, llama        last real token -> linear     refused (causal: no right   prompt -> completion,
                   (+ optional GPT-1 aux LM)     context)                    loss on the completion
t5                 text-to-text: label as text   refused                     text-to-text
=================  ============================  ==========================  =========================

Validation runs every ``train.eval_every`` steps and at the end; the best checkpoint by the task's
selection metric (accuracy, exact match, F1) is kept and restored, the test split is scored once with
it, and the model is saved to ``RUN_DIR/model`` (a classifier as transformers' ``…ForSequenceClassification``
/ ``…ForTokenClassification``).  ``init: random`` trains the same architecture from fresh weights — the
control that shows what pretraining bought; :func:`compare` runs pretrained and random over several seeds
next to the task's majority and bag-of-words baselines.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch

from lmforge.core.config import (deep_merge, load_config, parse_overrides, read_yaml, require, split_config_arg,
                                 to_dict)
from lmforge.core.errors import ConfigError, ModelError
from lmforge.core.io import atomic_write_json, atomic_write_text
from lmforge.core.seed import seed_everything
from lmforge.data.examples import ExampleSource
from lmforge.data.tasks import TaskConfig, TaskData, load_task
from lmforge.delta import DeltaConfig, DeltaSummary, apply_delta, merge_delta, mergeable, save_delta
from lmforge.delta import registry
from lmforge.eval.baselines import task_baselines
from lmforge.eval.task_eval import evaluate_classification, evaluate_text2text, evaluate_token_classification
from lmforge.models.families import family_of, get_family
from lmforge.models.io import load_model, save_model
from lmforge.models.task import SequenceClassifier, TokenClassifier, ensure_pad_token
from lmforge.objectives.classification import ClassificationObjective
from lmforge.objectives.completion import CompletionObjective
from lmforge.objectives.text_to_text import TextToTextObjective
from lmforge.objectives.token_classification import TokenClassificationObjective
from lmforge.train.distributed import DistributedConfig, setup_distributed
from lmforge.train.memory import measure_training_memory
from lmforge.train.rundir import DEFAULT_MUTABLE_KEYS, check_run_dir, check_run_outputs
from lmforge.train.run import Evaluation, RunSpec, check_run_keys
from lmforge.train.runlock import training_run
from lmforge.train.trainer import Trainer, TrainerConfig

PREDICTIONS_FILE = "predictions-test.jsonl"  # RUN_DIR/: input, gold, prediction of every test example
# full_lr and lr_from only say where train.lr came from (train.lr itself is compared on resume): a run started
# before they existed, or at the same rate given another way, resumes
MUTABLE_KEYS = DEFAULT_MUTABLE_KEYS | {"full_lr", "lr_from"}


@dataclass
class HeadConfig:
    dropout: Optional[float] = None
    """Classifier dropout (None: the backbone config's, as transformers does)."""
    aux_lm_weight: float = 0.0
    """Decoders, classification: weight λ of the auxiliary LM loss on the input (GPT-1 used 0.5)."""
    append_eos: bool = False
    """Decoders, classification: classify from the text's own last token (false, the default) or end each input
    with EOS and classify from that (GPT-1's "extract" token).  Measured on the pipeline's GPT-2 and world sentiment
    (200 steps, 3 seeds): the EOS state learns slower (test 0.984/0.816/0.982 vs 0.998/0.988/1.0).  transformers'
    classifier reads the last non-pad token either way, so the exported model needs no setting."""
    reinit_pooler: bool = False
    """BERT, sequence classification: start the pooler (``tanh(dense(h_[CLS]))``) afresh instead of from
    next-sentence pretraining (Zhang et al. 2021, "Revisiting Few-sample BERT Fine-tuning").  The saved model is
    still a plain ``BertForSequenceClassification``.  With a delta method the fresh pooler must train too
    (``peft.method=<method>+modules``, ``peft.train_modules=[pooler]``); a frozen random pooler is an error."""

    def __post_init__(self) -> None:
        require(self.dropout is None or 0.0 <= self.dropout < 1.0, "head.dropout", self.dropout, "in [0, 1)")
        require(self.aux_lm_weight >= 0, "head.aux_lm_weight", self.aux_lm_weight, ">= 0")


@dataclass
class CompareConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the comparison runs (each seed: one pretrained and one random-init run)."""
    random_init: bool = True
    """Also fine-tune the same architecture from random initialisation."""


def finetune_train_defaults() -> TrainerConfig:
    """The ``train:`` section fine-tuning starts from (shorter warmup, linear decay, frequent validation)."""
    return TrainerConfig(global_batch_size=32, lr=1e-4, warmup_steps=20, weight_decay=0.01, schedule="linear",
                         min_lr_ratio=0.0, eval_every=50, ckpt_every=50, keep_last=1, log_every=10)


@dataclass
class FinetuneConfig:
    run_dir: str = "runs/finetune"
    seed: int = 0
    max_steps: int = 300
    resume: Literal["auto", "true", "false"] = "false"
    overwrite: bool = False
    """Write the run into a dir holding files lmforge did not write for it (a model/ of yours, other files): only
    the run's own files are replaced, nothing else is deleted.  False: such a dir is refused."""
    model: str = "runs/pipeline"
    """A model dir (HF checkpoint, lmforge or transformers) or an lmforge run dir (its ``model/`` is used)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """random: the same architecture with fresh weights (the control for 'what did pretraining buy')."""
    task: TaskConfig = field(default_factory=TaskConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainerConfig = field(default_factory=finetune_train_defaults)
    full_lr: Optional[float] = None
    """Full fine-tuning's learning rate where ``train.lr`` is not set (None: ``finetune_train_defaults``' 1e-4).  A
    config calibrated for one model sets this instead of ``train.lr``, so that the same config with ``peft.method``
    trains at the delta method's own default (:func:`resolve_train_defaults`)."""
    lr_from: str = ""
    """Written when the config is loaded, not set by hand: where ``train.lr`` came from (``train.lr``: the config
    or the command line; ``lora's default``; ``full_lr``; ``fine-tuning's default``).  Empty: a config built in
    code, whose ``train`` section is taken as given."""
    eval_batch_size: int = 64
    max_new_tokens: int = 24
    """text2text: tokens generated per validation/test example."""
    compare: CompareConfig = field(default_factory=CompareConfig)
    """Used by ``lmforge finetune --compare``."""
    measure_memory: bool = False
    """Count training memory (parameters, gradients, optimizer state, saved activations of one micro-batch)
    before training; written to results.json (``lmforge bench peft`` turns it on)."""
    peft: DeltaConfig = field(default_factory=DeltaConfig)
    """Delta tuning: ``peft.method=lora`` (dora, adapter, bitfit, modules; '+' combines) trains only the delta and
    the head; the delta is saved to ``RUN_DIR/adapter`` (PEFT's format for LoRA/DoRA), the merged model to
    ``RUN_DIR/model`` (adapters do not merge: no ``model/``, load the base and the delta)."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Data parallelism under torchrun (ddp, zero1, fsdp): the delta is applied before wrapping/sharding; rank 0
    gathers the model to restore the best checkpoint, score the test split and save."""

    def __post_init__(self) -> None:
        check_run_keys(self)
        require(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, ">= 1")


@dataclass
class FinetunePlug:
    """What a recipe built on fine-tuning changes in it (``lmforge w2s``: a student on a weak supervisor's soft
    labels), everything else staying fine-tuning's own: the model, head, delta, Trainer, test scoring, saving."""

    objective: Optional[Callable[[Any], Any]] = None
    """The task objective -> the objective to train with (it also encodes and collates)."""
    train_examples: Optional[Callable[[list[Any]], list[Any]]] = None
    """The encoded training examples -> those to train on (e.g. with soft labels attached)."""
    select: bool = True
    """False: no validation-based selection, the final model is kept (no ground truth chooses it)."""
    after: Optional[Callable[[FinetuneParts], dict[str, Any]]] = None
    """Called with the trained parts before saving; what it returns is added to the results."""
    config: dict[str, Any] = field(default_factory=dict)
    """Settings of the plug saved with the run's config (a resume with other settings is refused)."""


# ---- building the pieces ------------------------------------------------------------------------
def resolve_model_dir(path: str) -> Path:
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    raise ModelError(f"model='{path}' is neither a model directory (config.json) nor a run directory with model/; "
                     f"pretrain first (lmforge pretrain / pipeline) or point model= at a checkpoint dir")


def _max_length(cfg: FinetuneConfig, model_cfg: Any) -> int:
    limit = getattr(model_cfg, "max_seq_len", None)
    # a soft prompt takes the first positions, and so does a decoder's prefix (t5 has no limit: relative positions)
    methods, family = cfg.peft.methods, family_of(model_cfg)
    shifted = "prompt" in methods or ("prefix" in methods and family is not None and family.kind == "decoder")
    prompt = cfg.peft.num_virtual_tokens if shifted else 0
    if limit is not None and prompt:
        limit -= prompt
    if cfg.task.max_length is None:
        return int(limit or 512)
    if limit is not None and cfg.task.max_length > limit:
        raise ConfigError(f"task.max_length={cfg.task.max_length} exceeds the model's max_seq_len={limit}"
                          + (f" (after the {prompt} prompt/prefix positions)" if prompt else "") + "; lower it")
    return cfg.task.max_length


def as_text2text(task: TaskData) -> TaskData:
    """T5 does classification as text-to-text: the label name is the target."""
    if task.type != "classification":
        return task

    def conv(r: dict[str, Any]) -> dict[str, Any]:
        text = r["text"] if "text_pair" not in r else f"{r['text']}\n{r['text_pair']}"
        return {"input": text, "target": r["label"], "where": r.get("where", "")}

    return dataclasses.replace(task, splits={k: [conv(r) for r in v] for k, v in task.splits.items()})


@dataclass
class FinetuneParts:
    cfg: FinetuneConfig
    task: TaskData
    mode: str
    model: torch.nn.Module
    tokenizer: Any
    objective: Any
    examples: dict[str, list[Any]]
    gen_inputs: dict[str, list[list[int]]]
    truncated: dict[str, int]
    trainer: Trainer
    select: tuple[str, str]
    source_task: TaskData  # the task as loaded (T5 sees classification as text2text in ``task``)
    delta: DeltaSummary | None = None
    model_dir: str = ""


def _build_model(cfg: FinetuneConfig, task: TaskData, mode: str, base: torch.nn.Module, tokenizer: Any):
    if mode in ("head", "token_head"):
        cls = SequenceClassifier if mode == "head" else TokenClassifier
        if isinstance(base, cls):  # continuing from a fine-tuned classifier: its labels must be the task's
            if list(base.id2label[i] for i in range(base.num_labels)) != list(task.labels):
                raise ConfigError(f"the model's labels {list(base.id2label.values())} differ from the task's "
                                  f"{task.labels}; start from the pretrained base model instead")
            model = base
        else:
            backbone = getattr(base, "backbone", base)
            model = cls(backbone, list(task.labels), dropout=cfg.head.dropout)
            if cfg.head.reinit_pooler:  # the pooler is the pooled classifier's (BERT's)
                if mode != "head" or get_family(model.family).classifier != "pooled":
                    raise ConfigError(f"head.reinit_pooler applies to BERT sequence classifiers, not a {model.family} "
                                      f"{'token classifier' if mode == 'token_head' else 'model'}; remove it")
                backbone.pooler.reset_parameters()  # a delta must then train it (checked after apply_delta)
        if get_family(model.family).needs_pad_token:
            ensure_pad_token(model, tokenizer)
        return model
    if isinstance(base, (SequenceClassifier, TokenClassifier)):
        raise ConfigError(f"'{cfg.model}' is a classifier; text-to-text fine-tuning needs the language model it was "
                          f"made from")
    if mode == "completion" and (tokenizer.pad_id is None or tokenizer.pad_id == tokenizer.eos_id):
        ensure_pad_token(base, tokenizer)
    return base


def _objective(cfg: FinetuneConfig, task: TaskData, mode: str, tokenizer: Any, family: str, max_len: int):
    if mode == "head":
        return ClassificationObjective(tokenizer, family, {l: i for i, l in enumerate(task.labels)}, max_len,
                                       aux_lm_weight=cfg.head.aux_lm_weight, append_eos=cfg.head.append_eos)
    if mode == "token_head":
        return TokenClassificationObjective(tokenizer, {l: i for i, l in enumerate(task.labels)}, max_len)
    if mode == "seq2seq":
        return TextToTextObjective(tokenizer, max_len, cfg.task.max_target_length)
    return CompletionObjective(tokenizer, max_len, cfg.task.max_target_length, cfg.task.prompt_template)


def select_metric(task_type: str, mode: str) -> str:
    if mode == "token_head":
        return "f1"
    return "accuracy" if task_type == "classification" else "exact_match"


def build(cfg: FinetuneConfig, progress: bool | None = None, plug: FinetunePlug | None = None) -> FinetuneParts:
    dist, device = setup_distributed(cfg.distributed, cfg.train.device)
    if dist.enabled:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
        dist.check_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size)  # before any expensive work
    dist.on_main(lambda: check_run_dir(cfg.run_dir, cfg.resume))  # fails fast, on every rank alike
    dist.on_main(lambda: check_run_outputs(cfg.run_dir, cfg.overwrite))
    with dist.main_first():  # rank 0 fills caches first
        task = load_task(cfg.task)
    model_dir = resolve_model_dir(cfg.model)
    base, tokenizer = load_model(model_dir)
    if tokenizer is None:
        raise ModelError(f"'{cfg.model}' has no tokenizer.json; fine-tuning needs the model's tokenizer saved with it")
    family = base.config.family
    mode = get_family(family).plan(task.type)
    if mode == "seq2seq":
        task_t2t = as_text2text(task)
    else:
        task_t2t = task
    seed_everything(cfg.seed)
    model = _build_model(cfg, task, mode, base, tokenizer)
    if cfg.init == "random":  # same architecture, fresh weights: every module re-initialises itself
        seed_everything(cfg.seed)
        if hasattr(model, "backbone"):
            model.backbone.reset_parameters()
        model.reset_parameters()
    delta = apply_delta(model, cfg.peft, tokenizer)  # after init: the delta starts from the weights it adapts
    if delta is not None and cfg.head.reinit_pooler and not all(
            p.requires_grad for p in model.backbone.pooler.parameters()):
        raise ConfigError(f"head.reinit_pooler=true with peft.method={cfg.peft.method} would leave a random pooler "
                          f"frozen (delta tuning trains the classifier, not the pooler, as PEFT does); train it too "
                          f"(peft.method={cfg.peft.method}+modules, peft.train_modules=[pooler]) or set "
                          f"head.reinit_pooler=false")
    if delta is not None:
        print(delta.line(), file=sys.stderr, flush=True)
    if cfg.lr_from:  # a loaded config: say which learning rate it trains at, and why
        print(f"lr {cfg.train.lr:g} ({cfg.lr_from})", file=sys.stderr, flush=True)
    model.train()
    max_len = _max_length(cfg, model.config)
    objective = _objective(cfg, task, mode, tokenizer, family, max_len)
    if plug is not None and plug.objective is not None:
        objective = plug.objective(objective)
    examples, truncated, gen_inputs = {}, {}, {}
    for split, records in task_t2t.splits.items():
        before = objective.truncated
        examples[split] = [objective.encode(r) for r in records]
        truncated[split] = objective.truncated - before
        if mode == "completion":  # generation prompts leave room for the answer
            gen_inputs[split] = [objective.prompt_ids(r["input"], max_len - cfg.max_new_tokens) for r in records]
        elif mode == "seq2seq":
            gen_inputs[split] = [x for x, _ in examples[split]]
    train_examples = examples["train"]
    if plug is not None and plug.train_examples is not None:
        train_examples = plug.train_examples(train_examples)
    source = ExampleSource(train_examples, objective.collate, seed=cfg.seed)
    metric = select_metric(task.type, mode)
    parts_ref: dict[str, Any] = {}

    def evaluator(m: torch.nn.Module) -> dict[str, float]:
        metrics, _ = evaluate_split(parts_ref["parts"], "validation", m)
        return {f"val_{k}": v for k, v in metrics.items()}

    # the best validation checkpoint is what gets scored and saved (restored by the Trainer at the end of fit)
    select = plug is None or plug.select
    evaluation = Evaluation(evaluator if task.splits["validation"] and select else None,
                            select_metric=f"val_{metric}", select_mode="max", restore_best=select)
    config_dict = to_dict(cfg) if plug is None or not plug.config else {**to_dict(cfg), "plug": plug.config}
    run = RunSpec(cfg.run_dir, cfg.max_steps, seed=cfg.seed, resume=cfg.resume, config_dict=config_dict,
                  mutable_keys=MUTABLE_KEYS)
    trainer = Trainer(model, objective, source, cfg.train, run, evaluation, dist=dist, progress=progress)
    parts = FinetuneParts(cfg, task_t2t, mode, model, tokenizer, objective, examples, gen_inputs, truncated, trainer,
                          (f"val_{metric}", "max"), task, delta, str(model_dir))
    parts_ref["parts"] = parts
    return parts


def evaluate_split(parts: FinetuneParts, split: str, model: torch.nn.Module | None = None
                   ) -> tuple[dict[str, float], list[Any]]:
    model = model if model is not None else parts.model
    examples, records = parts.examples[split], parts.task.splits[split]
    labels = parts.source_task.labels
    bs = parts.cfg.eval_batch_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if parts.mode == "head":
                return evaluate_classification(model, parts.objective, examples, labels, bs)
            if parts.mode == "token_head":
                return evaluate_token_classification(model, parts.objective, examples, records, labels, bs)
            return evaluate_text2text(model, parts.objective, examples, records, parts.tokenizer,
                                      model.config.family, parts.cfg.max_new_tokens, bs,
                                      gen_inputs=parts.gen_inputs[split], labels=labels)
    finally:
        model.train(was_training)


def finetune(cfg: FinetuneConfig, progress: bool | None = None, plug: FinetunePlug | None = None) -> dict[str, Any]:
    """Train (ending on the best checkpoint, or with ``plug.select=False`` the final one), score the test split
    once, save; return the results (also written to ``RUN_DIR/results.json``)."""
    with training_run(cfg.run_dir):  # the run dir's lock first: before the process group and any write
        return _finetune(cfg, progress, plug)


def _finetune(cfg: FinetuneConfig, progress: bool | None, plug: FinetunePlug | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    parts = build(cfg, progress, plug)
    trainer = parts.trainer
    memory = _measure_memory(parts) if cfg.measure_memory and not trainer.dist.enabled else None
    fit = trainer.fit()  # restores the best checkpoint: a collective under fsdp
    train_s = time.perf_counter() - t0
    selected = f"step {fit.best_step}" if fit.restored_best else "final"
    model = trainer.export_model()  # the whole model (rank 0 gathers it under fsdp)
    trainer.dist.barrier()  # the last collective: rank 0 now scores and saves alone, however long that takes
    if not trainer.dist.is_main:
        return {}
    parts.model = model.to(trainer.device)  # (fsdp's gathered copy is on the CPU: score on the training device)
    results: dict[str, Any] = {"run_dir": str(cfg.run_dir), "task": parts.task.name, "type": parts.task.type,
                               "family": model.config.family, "mode": parts.mode, "init": cfg.init,
                               "seed": cfg.seed, "selected": selected, "select_metric": parts.select[0],
                               "lr": cfg.train.lr, "lr_from": cfg.lr_from or "train.lr",
                               "sizes": parts.task.sizes(), "truncated": parts.truncated, "train_s": train_s,
                               "last": fit.final, "description": parts.task.description,
                               "closed_book": parts.task.closed_book, "held_out": parts.task.held_out}
    val, _ = evaluate_split(parts, "validation") if parts.task.splits["validation"] else ({}, [])
    results["validation"] = val
    if parts.task.splits["test"]:
        test, preds = evaluate_split(parts, "test")
        results["test"] = test
        rows = [_example_row(r, p) for r, p in zip(parts.task.splits["test"], preds)]
        results["test_examples"] = [{**row, "input": row["input"][:160]} for row in rows[:8]]
        # every test prediction, for error analysis (the report shows the first 8)
        atomic_write_text(Path(cfg.run_dir) / PREDICTIONS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    splits = parts.source_task.splits
    scored = "test" if splits["test"] else "validation"
    results["baselines"] = task_baselines(parts.source_task.type, {**splits, "test": splits[scored]})
    results["baselines_split"] = scored
    results["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    results["total_params"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if memory is not None:
        results["memory"] = memory
    if plug is not None and plug.after is not None:
        results.update(plug.after(parts))
    trainer.log_record({"step": trainer.step, **{f"test_{k}": v for k, v in results.get("test", {}).items()},
                        "selected": selected})
    model = model.cpu()
    if parts.delta is not None:
        adapter = save_delta(model, Path(cfg.run_dir) / "adapter", cfg.peft, base_model=parts.model_dir)
        results["delta"] = {"method": "+".join(parts.delta.methods), "trainable": parts.delta.trainable,
                            "total": parts.delta.total, "percent": parts.delta.percent,
                            "lora_layers": len(parts.delta.targets), "adapter_dir": str(adapter),
                            "adapter_bytes": sum(f.stat().st_size for f in adapter.iterdir() if f.is_file())}
        results["delta"]["merged"] = mergeable(model)
        if mergeable(model):
            merge_delta(model)  # RUN_DIR/model is a plain checkpoint of the adapted model
    if parts.delta is None or results["delta"]["merged"]:
        save_model(model, Path(cfg.run_dir) / "model", tokenizer=parts.tokenizer)
    else:  # adapters stay separate: the base (model_dir) + RUN_DIR/adapter, loaded with load_delta
        parts.tokenizer.save(Path(cfg.run_dir) / "adapter")
    atomic_write_json(Path(cfg.run_dir) / "results.json", results)
    return results


def _measure_memory(parts: FinetuneParts) -> dict[str, int]:
    """Training memory of one micro-batch of the first training examples (see :mod:`lmforge.train.memory`)."""
    t = parts.cfg.train
    n = min(len(parts.examples["train"]), t.micro_batch_size or t.global_batch_size)
    device = next(parts.model.parameters()).device
    batch = {k: v.to(device) if hasattr(v, "to") else v
             for k, v in parts.objective.collate(parts.examples["train"][:n]).items()}
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # RNG restored: a measured run trains as an unmeasured one
        return measure_training_memory(parts.model, parts.objective, batch, optimizer=t.optimizer)


def _example_row(rec: dict[str, Any], pred: Any) -> dict[str, Any]:
    gold = rec.get("label", rec.get("target", rec.get("tags")))
    text = rec.get("text", rec.get("input", " ".join(rec.get("tokens", []))))
    return {"input": text, "gold": gold if not isinstance(gold, list) else " ".join(gold),
            "prediction": pred if not isinstance(pred, list) else " ".join(pred)}


def resolve_train_defaults(cfg: FinetuneConfig, given: set[str]) -> FinetuneConfig:
    """``cfg`` with each ``train.*`` key the user did not give (``given``: the keys their config file and command
    line set) taken from the delta method's defaults (:func:`lmforge.delta.registry.train_defaults`; a combination:
    the method with the smallest default lr), and ``train.lr`` without one from ``full_lr`` if set; the rule is
    user value > method default > full fine-tuning's default.  ``lr_from`` records where ``train.lr`` came from."""
    defaults, method = registry.train_defaults(cfg.peft)
    chosen = {k: v for k, v in defaults.items() if k not in given}
    if "lr" in given:
        source = "train.lr"
    elif "lr" in chosen:
        source = f"{method}'s default"
    elif cfg.full_lr is not None:
        chosen["lr"], source = cfg.full_lr, "full_lr"
    else:
        source = "fine-tuning's default"
    try:
        train = dataclasses.replace(cfg.train, **chosen)
    except (TypeError, ValueError) as e:  # a registered method's defaults name a key TrainerConfig lacks
        raise ConfigError(f"peft.method={cfg.peft.method}: {method}'s train defaults {defaults} do not fit the "
                          f"train section ({e}); fix the method's train_defaults") from None
    return dataclasses.replace(cfg, train=train, lr_from=source)


def _given_train_keys(config_path: str | None, overrides: list[str]) -> set[str]:
    """The ``train.*`` keys the config file and the overrides set (whatever their values)."""
    data = deep_merge(read_yaml(config_path) if config_path else {}, parse_overrides(overrides))
    if "lr_from" in data:
        raise ConfigError(f"lr_from={data['lr_from']!r}: lmforge writes this key (where train.lr came from); "
                          f"remove it and set train.lr to choose the learning rate")
    train = data.get("train")
    return set(train) if isinstance(train, dict) else set()


def load_finetune_config(config_path: str | None, overrides: list[str]) -> FinetuneConfig:
    config_path, overrides = split_config_arg(config_path, overrides)
    cfg = load_config(FinetuneConfig, config_path, overrides)
    return resolve_train_defaults(cfg, _given_train_keys(config_path, overrides))


def run_finetune(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    return finetune(load_finetune_config(config_path, overrides))


# ---- pretrained vs random, over seeds -------------------------------------------------------------
def compare(cfg: FinetuneConfig, progress: bool | None = None) -> dict[str, Any]:
    """Fine-tune from the pretrained weights and (``compare.random_init``) from random init, once per seed in
    ``compare.seeds``, each in ``RUN_DIR/runs/<init>-seed<k>``; return per-run results and mean/std rows."""
    inits = ["pretrained"] + (["random"] if cfg.compare.random_init else [])
    runs: list[dict[str, Any]] = []
    total = len(inits) * len(cfg.compare.seeds)
    for init in inits:
        for seed in cfg.compare.seeds:
            print(f"[{len(runs) + 1}/{total}] fine-tuning from {init} weights, seed {seed}", file=sys.stderr, flush=True)
            sub = dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir) / "runs" / f"{init}-seed{seed}"), seed=seed,
                                      init=init)
            res = finetune(sub, progress=progress)
            runs.append(res)
    summary = []
    metric = runs[0]["select_metric"].removeprefix("val_")
    for init in inits:
        vals = [r["test"][metric] for r in runs if r["init"] == init and "test" in r]
        if vals:
            summary.append({"init": init, "metric": f"test {metric}", "mean": statistics.fmean(vals),
                            "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "runs": len(vals),
                            "values": vals})
    out = {"run_dir": cfg.run_dir, "task": runs[0]["task"], "family": runs[0]["family"], "metric": metric,
           "summary": summary, "baselines": runs[0]["baselines"], "runs": runs}
    if len(summary) == 2:
        out["pretrained_minus_random"] = summary[0]["mean"] - summary[1]["mean"]
    atomic_write_json(Path(cfg.run_dir) / "compare.json", out)
    return out


def run_compare(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    cfg = load_finetune_config(config_path, overrides)
    with training_run(cfg.run_dir):  # the parent dir too (compare.json), each run's own dir inside
        check_run_dir(cfg.run_dir, cfg.resume)
        return compare(cfg)


