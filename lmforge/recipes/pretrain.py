"""`lmforge pretrain`: tokenizer → token shards → model → Trainer → HF model dir, for every family.

The model family (``model.family``, any registered one) gives the config class the ``model:`` section is read as
(:class:`FamilySection`), the model class, and the pretraining objective by name: causal LM for decoders (gpt2,
llama), masked LM + next-sentence prediction for encoders (bert), span corruption for encoder–decoders (t5).  The
objective's parts — the special tokens of a new tokenizer, the batch source, the objective, the evaluator — come
from :mod:`lmforge.objectives.registry` and :data:`lmforge.eval.pretrain_eval.EVALUATORS` (:func:`paradigm_parts`);
everything else (shards, Trainer, checkpoints, resume, metrics) is shared.

Mostly wiring.  The tokenizer is, in order of preference: the one saved in the run dir (resume), the
one named by ``tokenizer.path``, or a new byte-level BPE trained on the run's own data and saved to
``RUN_DIR/tokenizer``.  The model's vocabulary follows the tokenizer unless the config sets a larger one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

import torch

from lmforge.core.config import SectionChoice, load_config, require, to_dict
from lmforge.core.errors import ConfigError, DataError, ModelError
from lmforge.core.seed import seed_everything
from lmforge.core.tokenizer import Tokenizer
from lmforge.data.shards import ShardSet, build_shards, train_tokenizer
from lmforge.data.span import add_sentinels
from lmforge.eval.pretrain_eval import EVALUATORS
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.families import families, get_family
from lmforge.models.families.base import train_flops_per_token
from lmforge.models.io import save_model
from lmforge.models.model_dir import record_train_window
from lmforge.objectives.mlm import MLMConfig
from lmforge.objectives.registry import PretrainingObjective, pretraining_objective
from lmforge.objectives.span import SpanConfig, compute_input_and_target_lengths
from lmforge.train.distributed import Dist, DistributedConfig, setup_distributed
from lmforge.train.rundir import check_run_dir, check_run_outputs
from lmforge.train.run import Evaluation, FitResult, RunSpec, check_run_keys
from lmforge.train.runlock import training_run
from lmforge.train.trainer import Trainer, TrainerConfig


@dataclass
class DataConfig:
    source: str = "world"
    """Text to train on: a .txt/.jsonl/.csv/.parquet file, folder, glob, HF dataset dir, or 'world'."""
    field: str = "text"
    """Field (jsonl) or column (csv/parquet) holding the text."""
    txt_split: Literal["paragraph", "file", "line"] = "paragraph"
    """How a .txt file becomes documents (EOS after each): blank-line-separated paragraphs, the whole file as
    written, or each non-blank line."""
    seq_len: int = 256
    """Tokens per training window (documents are packed, EOS between them)."""
    val_fraction: float = 0.01
    """Share of documents held out for validation."""
    world_bytes: int = 12_000_000
    """Size of the built-in world corpus when source is 'world'."""
    cache_dir: Optional[str] = None
    """Where token shards are cached (default $LMFORGE_CACHE/shards; $LMFORGE_CACHE defaults to ~/.cache/lmforge)."""
    num_workers: Optional[int] = None
    """Tokenisation workers (None: the tokenizer's own thread pool)."""

    def __post_init__(self) -> None:
        require(self.seq_len >= 1, "data.seq_len", self.seq_len, ">= 1")
        require(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "in [0, 1) (e.g. 0.01)")
        require(self.world_bytes >= 1, "data.world_bytes", self.world_bytes, ">= 1")
        require(self.num_workers is None or self.num_workers >= 0, "data.num_workers", self.num_workers,
                ">= 0 (or null for the tokenizer's own threads)")


@dataclass
class TokenizerConfig:
    path: Optional[str] = None
    """An existing tokenizer (dir with tokenizer.json, or the file). None: train one on the data."""
    vocab_size: Optional[int] = None
    """Vocabulary of a newly trained tokenizer (None: model.vocab_size)."""
    train_bytes: int = 4_000_000
    """Text used to train a new tokenizer (the first bytes of the data)."""

    def __post_init__(self) -> None:
        require(self.train_bytes >= 1, "tokenizer.train_bytes", self.train_bytes, ">= 1")


class FamilySection(SectionChoice):
    """The ``model:`` section is the config class of the family that ``model.family`` names (gpt2 when unset),
    through the family registry, so a family registered anywhere is read from YAML and overrides alike."""

    key, default = "family", "gpt2"

    def resolve(self, tag: Any) -> type | None:
        return get_family(tag).config_class if tag in self.names() else None

    def names(self) -> list[str]:
        return [f.name for f in families()]

    def classes(self) -> list[type]:
        return list(dict.fromkeys(f.config_class for f in families()))  # llama shares gpt2's DecoderConfig


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    seed: int = 0
    max_steps: int = 1000
    resume: Literal["auto", "true", "false"] = "false"
    overwrite: bool = False
    """Write the run into a dir holding files lmforge did not write for it (a model/ of yours, other files): only
    the run's own files are replaced, nothing else is deleted.  False: such a dir is refused."""
    model: Annotated[Any, FamilySection()] = field(default_factory=DecoderConfig)
    """The architecture; ``model.family`` (gpt2 | llama | bert | t5, or a registered family) picks the config
    fields and the objective."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    """Masking and next-sentence settings (bert only)."""
    span: SpanConfig = field(default_factory=SpanConfig)
    """Span-corruption settings (t5 only); ``span.inputs_length`` is the encoder length (data.seq_len is unused)."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Data parallelism under torchrun (ddp, zero1, fsdp); see lmforge/train/distributed.py."""

    def __post_init__(self) -> None:
        check_run_keys(self)


def objective_spec(model_cfg: Any) -> PretrainingObjective:
    """The pretraining objective the model config's family names."""
    return pretraining_objective(get_family(model_cfg.family).pretrain_objective)


def train_window_of(cfg: PretrainConfig) -> int:
    """Tokens per training input: ``data.seq_len``, or the objective's own length setting (T5: span.inputs_length)."""
    spec = objective_spec(cfg.model)
    if spec.window_key is None:
        return cfg.data.seq_len
    return int(getattr(getattr(cfg, spec.settings_key), spec.window_key))


def max_len_of(cfg: Any) -> int | None:
    return getattr(cfg, "max_seq_len", None)


def resolve_tokenizer(cfg: PretrainConfig, resuming: bool) -> Tokenizer:
    saved = Path(cfg.run_dir) / "tokenizer"
    if resuming and (saved / "tokenizer.json").exists():
        return Tokenizer.load(saved)
    if cfg.tokenizer.path:
        return Tokenizer.load(cfg.tokenizer.path)
    vocab = cfg.tokenizer.vocab_size or cfg.model.vocab_size
    spec = objective_spec(cfg.model)  # its special tokens; sentinels are appended after training (the last ids)
    specials = None if spec.special_tokens is None else list(spec.special_tokens)
    tok = train_tokenizer(cfg.data.source, vocab - spec.sentinels, saved,
                          special_tokens=specials, max_bytes=cfg.tokenizer.train_bytes,
                          field=cfg.data.field, world_bytes=cfg.data.world_bytes,
                          model_max_length=max_len_of(cfg.model), kind="run-tokenizer",
                          txt_split=cfg.data.txt_split)
    if spec.sentinels:  # <extra_id_i> = vocab_size - 1 - i, as T5 expects
        tok = add_sentinels(tok, spec.sentinels)
        tok.save(saved)
    return tok


def model_config_for(cfg: Any, tokenizer: Tokenizer) -> Any:
    """The model's vocabulary must cover the tokenizer's; special-token ids come from the tokenizer."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.vocab_size}; "
                         f"set model.vocab_size >= {tokenizer.vocab_size} or use a smaller tokenizer")
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in ids.items() if k in names})


def build_model(cfg: Any) -> torch.nn.Module:
    """The model class of the config's family, freshly initialised."""
    return get_family(cfg.family).model_class(cfg)


def paradigm_parts(cfg: PretrainConfig, shards: ShardSet, tokenizer: Tokenizer, split: str = "train"
                   ) -> tuple[Any, Any, Any]:
    """(objective, batch source over ``split``, evaluator) for the model family's pretraining objective.

    The source shuffles for the train split; the evaluator reads the val split in a fixed order (fixed masks
    and corruptions), or is None when the val split is too small for one window (or the objective has no
    evaluator in :data:`~lmforge.eval.pretrain_eval.EVALUATORS`)."""
    spec = objective_spec(cfg.model)
    settings = getattr(cfg, spec.settings_key) if spec.settings_key else None  # e.g. cfg.mlm, cfg.span
    eval_bs = cfg.train.micro_batch_size or cfg.train.global_batch_size
    max_batches = cfg.train.eval_max_batches or None

    def source(split: str, shuffle: bool):
        return spec.source(shards, split, tokenizer, seq_len=cfg.data.seq_len, settings=settings, seed=cfg.seed,
                           shuffle=shuffle)

    src = source(split, split == "train")
    try:
        val = source("val", False)
    except (DataError, ConfigError):  # too little validation text for one window: train without validation
        val = None
    objective, evaluate = spec.objective(tokenizer, settings, cfg.seed), EVALUATORS.get(spec.name)
    if val is None or evaluate is None:
        evaluator = None
    else:
        evaluator = lambda model: evaluate(model, val.val_batches(eval_bs, max_batches))  # noqa: E731
    return objective, src, evaluator


def run_flops_per_token(cfg: PretrainConfig) -> float | None:
    """Training FLOPs per input token of this run by its family's formula (``Family.flops``), with the sizes each
    formula reads: the input window, the MLM mask rate (bert), the span-corruption target length (t5); None when the
    family registers no formula."""
    if get_family(cfg.model.family).flops is None:
        return None
    targets = compute_input_and_target_lengths(cfg.span.inputs_length, cfg.span.noise_density,
                                               cfg.span.mean_noise_span_length)[1]
    return train_flops_per_token(cfg.model, train_window_of(cfg), mask_rate=cfg.mlm.mask_prob, target_len=targets)


@dataclass
class PretrainParts:
    """Everything a pretraining run is made of, for recipes (the pipeline) that add stages around it."""

    cfg: PretrainConfig
    tokenizer: Tokenizer
    shards: ShardSet
    model: torch.nn.Module
    trainer: Trainer
    timings: dict[str, float]
    dist: Dist = field(default_factory=Dist)


def build(cfg: PretrainConfig, progress: bool | None = None,
          say: Callable[[str], None] = lambda _text: None) -> PretrainParts:
    """The run's tokenizer, shards, model and Trainer.  ``say``: told each step as it starts and ends (the pipeline
    prints them, so the minutes before the first training step are not silent)."""
    timings: dict[str, float] = {}
    dist, device = setup_distributed(cfg.distributed, cfg.train.device)
    if dist.enabled:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
        dist.check_batch(cfg.train.global_batch_size, cfg.train.micro_batch_size)  # before any expensive work
    resuming = dist.on_main(lambda: check_run_dir(cfg.run_dir, cfg.resume))  # fails fast, on every rank alike
    dist.on_main(lambda: check_run_outputs(cfg.run_dir, cfg.overwrite))
    # Rank 0 trains the tokenizer and builds the shards; the other ranks then load them.
    with dist.main_first():
        seed_everything(cfg.seed)

        t = time.perf_counter()
        say(f"tokenizer: loading or training one on {cfg.data.source} (the built-in world is generated into the "
            f"cache on first use)")
        saved = Path(cfg.run_dir) / "tokenizer" / "tokenizer.json"
        if not dist.is_main and saved.exists():
            tokenizer = Tokenizer.load(saved.parent)
        else:
            tokenizer = resolve_tokenizer(cfg, resuming)
        timings["tokenizer_s"] = time.perf_counter() - t
        say(f"tokenizer: {tokenizer.vocab_size} tokens ({timings['tokenizer_s']:.1f} s); tokenising the corpus into "
            f"train/validation shards (cached: a second run reuses them)")

        t = time.perf_counter()
        shards = build_shards(cfg.data.source, tokenizer, cfg.data.cache_dir, field=cfg.data.field,
                              val_fraction=cfg.data.val_fraction, num_workers=cfg.data.num_workers, seed=cfg.seed,
                              world_bytes=cfg.data.world_bytes, txt_split=cfg.data.txt_split)
        timings["shards_s"] = time.perf_counter() - t
        say(f"shards: {shards.num_tokens('train'):,} train / {shards.num_tokens('val'):,} validation tokens "
            f"({'reused' if shards.reused else 'built'}, {timings['shards_s']:.1f} s); building the model")

    model_cfg = model_config_for(cfg.model, tokenizer)
    if max_len_of(model_cfg) is not None and cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}; "
                          f"lower data.seq_len or raise model.max_seq_len")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    if dist.strategy == "fsdp" and not dist.is_main:
        with torch.device("meta"):  # rank 0 builds the weights and broadcasts them into every rank's shards
            model = build_model(model_cfg)
    else:
        model = build_model(model_cfg)
    objective, train_src, evaluator = paradigm_parts(cfg, shards, tokenizer)
    fpt = run_flops_per_token(cfg)  # mfu in the log lines (None: the family registers no FLOP formula)
    # pretraining exports the final model: the best checkpoint by val_loss is kept, not restored
    trainer = Trainer(model, objective, train_src, cfg.train,
                      RunSpec(cfg.run_dir, cfg.max_steps, seed=cfg.seed, resume=cfg.resume, config_dict=to_dict(cfg)),
                      Evaluation(evaluator), dist=dist, progress=progress, flops_per_token=fpt)
    saved = Path(cfg.run_dir) / "tokenizer"
    if dist.is_main and not (saved / "tokenizer.json").exists():
        tokenizer.save(saved, model_max_length=max_len_of(model_cfg))
    return PretrainParts(cfg, tokenizer, shards, model, trainer, timings, dist)


def train_and_save(parts: PretrainParts) -> FitResult:
    """Train the built run, then save the final model to ``RUN_DIR/model`` (every rank calls it under torchrun;
    rank 0 saves); ``parts.timings["train_s"]`` is the training time."""
    t = time.perf_counter()
    fit = parts.trainer.fit()
    parts.timings["train_s"] = time.perf_counter() - t
    model = parts.trainer.export_model()  # collective under fsdp: every rank takes part, rank 0 gets it
    if parts.dist.is_main:
        model_dir = save_model(model.cpu(), Path(parts.cfg.run_dir) / "model", tokenizer=parts.tokenizer)
        record_train_window(model_dir, train_window_of(parts.cfg))  # eval perplexity's default window
    parts.dist.barrier()
    return fit


def pretrain(cfg: PretrainConfig, progress: bool | None = None) -> dict[str, Any]:
    with training_run(cfg.run_dir):  # the run dir's lock first: before the process group and any write
        parts = build(cfg, progress)
        fit = train_and_save(parts)
    return {"run_dir": str(cfg.run_dir), **fit.final, **parts.timings}


def run_pretrain(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    return pretrain(load_config(PretrainConfig, config_path, overrides))
