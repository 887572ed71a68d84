"""Pretraining objectives by name: what a recipe needs to build one from the pieces of a run config.

Built in: ``causal_lm`` (GPT-2, Llama), ``mlm_nsp`` (BERT; ``mlm.nsp: false`` drops NSP) and ``span`` (T5).  A model
family names its pretraining objective by one of these names; a recipe looks the name up here for the objective
and its batch source, and in :data:`lmforge.eval.pretrain_eval.EVALUATORS` for its validation evaluator (eval
sits above objectives).  Code outside lmforge adds its own with :func:`register`.

A spec also says what a tokenizer trained for it holds (``special_tokens``, ``sentinels``): the objective is what
needs them (masking reads [MASK]/[CLS]/[SEP], span corruption the sentinels on the last ids), so a family that
picks an objective gets a tokenizer that fits it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lmforge.core.errors import ConfigError
from lmforge.data.loader import PackedWindows
from lmforge.data.span import t5_special_tokens
from lmforge.objectives.base import Objective
from lmforge.objectives.causal_lm import CausalLMObjective
from lmforge.objectives.mlm import BERT_SPECIAL_TOKENS, MLMBatchSource, MLMObjective, MLMVocab
from lmforge.objectives.seq2seq import Seq2SeqObjective
from lmforge.objectives.span import SpanCorruptionSource


@dataclass(frozen=True)
class PretrainingObjective:
    """A pretraining objective as a recipe builds it.  ``settings`` is the objective's settings object (the run
    config's section named by ``settings_key``, e.g. ``PretrainConfig.mlm``; None for an objective without one)."""

    name: str
    objective: Callable[[Any, Any, int], Objective]
    """``objective(tokenizer, settings, seed)`` -> the :class:`~lmforge.objectives.base.Objective`."""
    source: Callable[..., Any]
    """``source(shards, split, tokenizer, *, seq_len, settings, seed, shuffle)`` -> a batch source over a
    :class:`~lmforge.data.shards.ShardSet` split (``next_batch``, ``state_dict``, ``val_batches``)."""
    settings_key: str | None = None
    special_tokens: tuple[str, ...] | None = None
    """Special tokens (the first ids, in order) of a tokenizer trained for the objective; None: the tokenizer's
    default (``<|endoftext|>`` = BOS = EOS, ``<|pad|>``)."""
    sentinels: int = 0
    """Sentinels ``<extra_id_i>`` appended to such a tokenizer after training, on ids ``vocab_size - 1 - i`` (span
    corruption's; :func:`lmforge.data.span.add_sentinels`), out of the same vocabulary size."""
    window_key: str | None = None
    """The field of ``settings`` that holds the tokens per training input when it is not ``data.seq_len`` (span
    corruption: ``inputs_length``); the model dir records that window, and evaluation defaults to it."""


_OBJECTIVES: dict[str, PretrainingObjective] = {}


def register(spec: PretrainingObjective) -> PretrainingObjective:
    """Add ``spec`` under ``spec.name`` (a name is registered once)."""
    if spec.name in _OBJECTIVES:
        raise ValueError(f"a pretraining objective named '{spec.name}' is already registered")
    _OBJECTIVES[spec.name] = spec
    return spec


def pretraining_objective(name: str) -> PretrainingObjective:
    if name not in _OBJECTIVES:
        raise ConfigError(f"unknown pretraining objective '{name}'; registered: {', '.join(sorted(_OBJECTIVES))}")
    return _OBJECTIVES[name]


def pretraining_objectives() -> list[str]:
    return sorted(_OBJECTIVES)


# ---- the built-in objectives --------------------------------------------------------------------------

def _windows(shards: Any, split: str, tokenizer: Any, *, seq_len: int, settings: Any, seed: int,
             shuffle: bool) -> PackedWindows:
    return PackedWindows(shards.tokens(split), seq_len, seed=seed, shuffle=shuffle)


def _mlm_batches(shards: Any, split: str, tokenizer: Any, *, seq_len: int, settings: Any, seed: int,
                 shuffle: bool) -> MLMBatchSource:
    return MLMBatchSource.from_shards(shards, split, tokenizer, seq_len, settings, seed=seed, shuffle=shuffle)


def _span_batches(shards: Any, split: str, tokenizer: Any, *, seq_len: int, settings: Any, seed: int,
                  shuffle: bool) -> SpanCorruptionSource:
    # span.inputs_length, not seq_len, sets the encoder length
    return SpanCorruptionSource.from_shards(shards, split, tokenizer, settings, seed=seed, shuffle=shuffle)


register(PretrainingObjective(
    "causal_lm", lambda tokenizer, settings, seed: CausalLMObjective(pad_id=tokenizer.pad_id or 0), _windows))
register(PretrainingObjective(
    "mlm_nsp", lambda tokenizer, settings, seed: MLMObjective(MLMVocab.from_tokenizer(tokenizer), settings, seed=seed),
    _mlm_batches, settings_key="mlm", special_tokens=BERT_SPECIAL_TOKENS))
register(PretrainingObjective(
    "span", lambda tokenizer, settings, seed: Seq2SeqObjective(pad_id=tokenizer.pad_id or 0), _span_batches,
    settings_key="span", special_tokens=tuple(t5_special_tokens()), sentinels=100,  # T5's 100 sentinels
    window_key="inputs_length"))
