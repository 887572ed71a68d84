"""Fine-tuning tasks: labelled examples from the built-in world or from users' files, checked and split.

A task is one of three types, each a plain record shape (field names configurable for user files):

* ``classification``       ``{"text": str, "text_pair": str (optional), "label": str}``
* ``token_classification`` ``{"tokens": [word, ...], "tags": [tag, ...]}`` (one tag per whitespace word)
* ``text2text``            ``{"input": str, "target": str}`` (decoders read it as prompt -> completion)

:func:`load_task` returns the three splits (train / validation / test).  World tasks come with their own
deterministic splits (``lmforge.data.world.tasks``); user tasks read ``task.train`` and, when given,
``task.validation`` / ``task.test`` (.jsonl, .json, .csv, .tsv, .parquet); a missing validation split is cut
from train deterministically (``task.val_fraction``, by ``seed``), a missing test split is left empty.

Every mistake in a file — a missing field, an empty text, a label outside the label set, tags that do not
line up with tokens — is a :class:`DataError` naming ``file:line``, the field and the fix.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.readers import Wording, file_ext, read_records, record_format
from lmforge.data.world.tasks import build_world_task, world_task

TASK_TYPES = ("classification", "token_classification", "text2text")
SPLITS = ("train", "validation", "test")


@dataclass
class TaskConfig:
    """The ``task:`` section of a fine-tuning config."""

    name: Optional[str] = "world-sentiment"
    """A built-in world task (world-sentiment, world-sentiment-mixed, world-topic, world-ner, world-qa-context,
    world-qa-closed); set to null and give ``train`` (+ ``validation``/``test``) for your own files."""
    type: Literal["auto", "classification", "token_classification", "text2text"] = "auto"
    """auto: from the world task, or from the fields of the first training record."""
    train: Optional[str] = None
    validation: Optional[str] = None
    test: Optional[str] = None
    text_field: str = "text"
    text_pair_field: str = "text_pair"
    label_field: str = "label"
    input_field: str = "input"
    target_field: str = "target"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    labels: list[str] = field(default_factory=list)
    """The label (or tag) set, in id order.  Empty: the sorted labels of the training split."""
    val_fraction: float = 0.1
    """Share of train cut off as validation when no validation file is given."""
    max_length: Optional[int] = None
    """Tokens per input (longer ones are truncated and counted in the report).  None: the model's maximum
    (512 for T5, whose relative positions have none)."""
    max_target_length: int = 32
    """Tokens per text2text target / completion (longer ones are truncated and counted)."""
    prompt_template: str = "{input}\nAnswer:"
    """Decoders on text2text tasks: the prompt; the completion is ' ' + target + EOS."""
    n_train: int = 2000
    n_val: int = 300
    n_test: int = 500
    """World tasks: examples per split."""
    world_seed: int = 0
    """World tasks: the world (the one ``world:SEED`` pretrains on)."""
    counterfactual: float = 0.0
    """world-qa-context: share of train records whose answer is swapped (in passage and target) for another
    entity's value of the same relation, so fine-tuning cannot recall train answers and must read them;
    validation and test keep the world's facts."""
    split_seed: int = 0
    """Seed of the splits (world tasks' entity split, the validation cut from user train files): fixed by default
    so runs with different training seeds see the same task."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"task.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_length is not None and self.max_length < 4:
            raise ConfigError(f"task.max_length must be >= 4, got {self.max_length}")
        if self.max_target_length < 1:
            raise ConfigError(f"task.max_target_length must be >= 1, got {self.max_target_length}")
        if "{input}" not in self.prompt_template:
            raise ConfigError(f"task.prompt_template must contain '{{input}}', got {self.prompt_template!r}")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"task.labels lists a label twice: {self.labels}")


@dataclass
class TaskData:
    """A loaded task: normalised records per split plus what the report says about it."""

    name: str
    type: str
    splits: dict[str, list[dict[str, Any]]]
    labels: list[str] | None  # classification labels / token tags in id order; None for text2text
    description: str = ""
    closed_book: bool | None = None
    held_out: str = ""

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}


# ---- reading records ------------------------------------------------------------------------------
class _TaskWording(Wording):
    """The task loader's wording of the record reader's syntax errors."""

    def bad_utf8(self, path: Path, line: int | None, byte: int, offset: int) -> str:
        return f"{path}:1: not valid UTF-8 (byte {offset}); save the file as UTF-8"

    def bad_json_array(self, path: Path, e: json.JSONDecodeError) -> str:
        return f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file"

    def bad_csv(self, path: Path, line_num: int, e: Exception) -> str:
        return f"{path}:{line_num}: not valid UTF-8 CSV ({e}); fix that line"


def iter_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each row of a .jsonl/.json/.csv/.tsv/.parquet file (read by
    :func:`lmforge.data.readers.read_records`); ``where`` is ``file:line`` (``file:item N`` for JSON arrays,
    ``file:row N`` for Parquet rows) for error messages."""
    p = Path(path)
    if not p.is_file():
        why = "does not exist" if not p.exists() else "is not a file"
        raise DataError(f"task file '{p}' {why}; pass a .jsonl, .json, .csv, .tsv or .parquet file")
    if record_format(p) is None:
        raise DataError(f"task file '{p}' has an unsupported type '{file_ext(p) or p.suffix}'; use .jsonl, .json, "
                        f".csv, .tsv or .parquet")
    for where, obj in read_records(p, wording=_TaskWording()):
        yield _as_record(obj, str(where))


def _as_record(obj: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return where, obj


def _records(path: str) -> list[tuple[str, dict[str, Any]]]:
    out = list(iter_records(path))
    if not out:
        raise DataError(f"task file '{path}' holds no records; add examples or point task.train elsewhere")
    return out


# ---- normalising records --------------------------------------------------------------------------
def _field(rec: dict[str, Any], key: str, where: str, cfg_key: str, optional: bool = False) -> Any:
    if key not in rec or rec[key] is None:
        if optional:
            return None
        present = ", ".join(map(str, list(rec)[:20])) or "none"
        raise DataError(f"{where}: no field '{key}' (fields present: {present}); add it or set task.{cfg_key}")
    return rec[key]


def _text(rec: dict[str, Any], key: str, where: str, cfg_key: str, optional: bool = False) -> str | None:
    value = _field(rec, key, where, cfg_key, optional)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' is a {type(value).__name__}, not a string; set task.{cfg_key} to "
                        f"a text field")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty; remove the example or fill in its text")
    return value


def _label(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label field '{key}' is a {type(value).__name__}; labels must be strings or "
                        f"integers")
    label = str(value).strip()
    if not label:
        raise DataError(f"{where}: label field '{key}' is empty; give every example a label")
    return label


def infer_type(rec: dict[str, Any], cfg: TaskConfig, where: str) -> str:
    if cfg.tags_field in rec and cfg.tokens_field in rec:
        return "token_classification"
    if cfg.label_field in rec:
        return "classification"
    if cfg.target_field in rec:
        return "text2text"
    present = ", ".join(map(str, list(rec)[:20])) or "none"
    raise DataError(f"{where}: cannot tell the task type from the fields ({present}); expected '{cfg.label_field}' "
                    f"(classification), '{cfg.tags_field}'+'{cfg.tokens_field}' (token_classification) or "
                    f"'{cfg.input_field}'+'{cfg.target_field}' (text2text) — set task.type and the task.*_field keys")


def normalise(rec: dict[str, Any], task_type: str, cfg: TaskConfig, where: str) -> dict[str, Any]:
    """A user record -> the canonical record shape of ``task_type`` (with ``where`` kept for errors)."""
    if task_type == "classification":
        out = {"text": _text(rec, cfg.text_field, where, "text_field"),
               "label": _label(_field(rec, cfg.label_field, where, "label_field"), where, cfg.label_field)}
        pair = _text(rec, cfg.text_pair_field, where, "text_pair_field", optional=True)
        if pair is not None:
            out["text_pair"] = pair
    elif task_type == "text2text":
        out = {"input": _text(rec, cfg.input_field, where, "input_field"),
               "target": _text(rec, cfg.target_field, where, "target_field")}
    else:
        tokens = _field(rec, cfg.tokens_field, where, "tokens_field")
        tags = _field(rec, cfg.tags_field, where, "tags_field")
        if isinstance(tokens, str):
            tokens = tokens.split()
        if isinstance(tags, str):
            tags = tags.split()
        if not isinstance(tokens, list) or not isinstance(tags, list):
            raise DataError(f"{where}: '{cfg.tokens_field}' and '{cfg.tags_field}' must be lists (or "
                            f"space-separated strings)")
        if not tokens:
            raise DataError(f"{where}: field '{cfg.tokens_field}' is empty; remove the example")
        if len(tokens) != len(tags):
            raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags; give one tag per token")
        if any(not isinstance(t, str) or not t.strip() or any(c.isspace() for c in t) for t in tokens):
            raise DataError(f"{where}: every token must be a non-empty string without spaces")
        out = {"tokens": list(tokens), "tags": [_label(t, where, cfg.tags_field) for t in tags]}
    out["where"] = where
    return out


def _check_labels(splits: dict[str, list[dict[str, Any]]], task_type: str, given: list[str]) -> list[str] | None:
    """The label set (given, else the sorted training labels); any example outside it is an error."""
    if task_type == "text2text":
        return None
    key = "label" if task_type == "classification" else "tags"

    def labels_of(rec: dict[str, Any]) -> list[str]:
        return [rec[key]] if task_type == "classification" else rec[key]

    train_labels = sorted({x for r in splits["train"] for x in labels_of(r)})
    labels = list(given) if given else train_labels
    if task_type == "token_classification" and given == [] and "O" in labels:
        labels = ["O"] + [t for t in labels if t != "O"]
    known = set(labels)
    source = "task.labels" if given else "the training split"
    for split in SPLITS:
        for rec in splits.get(split, []):
            for x in labels_of(rec):
                if x not in known:
                    raise DataError(f"{rec.get('where', split)}: label '{x}' is not in the label set {labels} "
                                    f"(from {source}); fix the label or list it in task.labels")
    if len(labels) < 2 and task_type == "classification":
        raise DataError(f"the training split has a single label {labels}; classification needs at least two")
    return labels


def _split_off(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * fraction))
    if n_val >= len(records):
        raise DataError(f"only {len(records)} training example(s): too few to cut a validation split; add examples "
                        f"or give task.validation")
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [records[i] for i in keep], [records[i] for i in val]


def load_task(cfg: TaskConfig) -> TaskData:
    """The task of ``cfg``: a world task by name, else the user's files."""
    if cfg.name and cfg.train:
        raise ConfigError(f"task.name={cfg.name!r} and task.train={cfg.train!r} are both set; set task.name=null to "
                          f"use your own files, or drop task.train to use the world task")
    if cfg.name:
        spec = world_task(cfg.name)
        if cfg.type not in ("auto", spec.type):
            raise ConfigError(f"task.type={cfg.type} but world task '{cfg.name}' is {spec.type}; set task.type=auto")
        raw = build_world_task(cfg.name, seed=cfg.split_seed, n_train=cfg.n_train, n_val=cfg.n_val,
                               n_test=cfg.n_test, world_seed=cfg.world_seed, counterfactual=cfg.counterfactual)
        splits = {s: [normalise(r, spec.type, TaskConfig(), f"{cfg.name}/{s}[{i}]") for i, r in enumerate(raw[s])]
                  for s in SPLITS}
        labels = _check_labels(splits, spec.type, cfg.labels or list(spec.labels or []))
        description = spec.description + (f"; {cfg.counterfactual:.0%} of train answers swapped for another entity's "
                                          f"value (task.counterfactual)" if cfg.counterfactual else "")
        return TaskData(cfg.name, spec.type, splits, labels, description, spec.closed_book, spec.held_out)
    if not cfg.train:
        raise ConfigError("no task: set task.name to a world task (e.g. world-sentiment) or task.train to a file")
    raw_train = _records(cfg.train)
    task_type = cfg.type if cfg.type != "auto" else infer_type(raw_train[0][1], cfg, raw_train[0][0])
    splits = {"train": [normalise(r, task_type, cfg, w) for w, r in raw_train]}
    if cfg.validation:
        splits["validation"] = [normalise(r, task_type, cfg, w) for w, r in _records(cfg.validation)]
    else:
        splits["train"], splits["validation"] = _split_off(splits["train"], cfg.val_fraction, cfg.split_seed)
    splits["test"] = [normalise(r, task_type, cfg, w) for w, r in _records(cfg.test)] if cfg.test else []
    labels = _check_labels(splits, task_type, cfg.labels)
    return TaskData(Path(cfg.train).stem, task_type, splits, labels, f"user task from {cfg.train}")
