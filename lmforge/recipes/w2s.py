"""`lmforge w2s`: the weak-to-strong experiment (Burns et al. 2023, "Weak-to-strong generalization") on a task.

Per seed, every run a fine-tuning run (:mod:`lmforge.recipes.finetune`: its classifier heads, delta methods,
Trainer, test scoring and saving), each in its own directory under ``RUN_DIR/seed<k>/``:

1. ``weak``: the weak model fine-tuned on the ground truth of split A; its soft labels (class probabilities) on
   split B and on test are written to ``weak/weak-probs.json``;
2. ``strong-<loss>``: the strong model fine-tuned on the weak soft labels of B, with each loss of
   :mod:`lmforge.objectives.weak_to_strong` (``ce``; ``logconf``, the auxiliary confidence loss);
3. ``ceiling``: the strong model fine-tuned on the ground truth of B;
4. with ``chain`` (bootstrapping): weak → each intermediate model → strong, each trained on its predecessor's soft
   labels of its own disjoint part of B (so no model labels examples it was trained on), ``chain_loss``.

Every run trains a fixed number of steps and keeps its final model (the paper's protocol): no validation selects a
checkpoint, so no ground truth reaches the student.  Splits: A and B are disjoint parts of the task's train split
(fixed by ``task.split_seed``, the same for every seed); validation is reported only; test scores everything.

A run whose directory holds ``w2s-done.json`` with the same settings is read, not redone; one cut off resumes from
its last checkpoint (``resume=auto``).  The summary (``w2s.json``): accuracies, PGR = (w2s − weak) / (ceiling −
weak) per seed and its median, percentile intervals by a paired bootstrap over test examples, and student–weak
agreement (overall, and on the test examples the weak model gets wrong: does the student copy its errors?).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lmforge.core.config import load_config, require, split_config_arg, to_dict
from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import atomic_write_json, atomic_write_text
from lmforge.data.tasks import TaskConfig, load_task
from lmforge.eval.task_eval import classification_probs
from lmforge.models.model_dir import read_json, read_weights
from lmforge.objectives.weak_to_strong import LOSSES, SoftLabelObjective
from lmforge.recipes.finetune import (PREDICTIONS_FILE, FinetuneParts, FinetunePlug, finetune, load_finetune_config,
                                      resolve_model_dir)

DONE_FILE = "w2s-done.json"  # written last in a run dir: the run finished with these settings
PROBS_FILE = "weak-probs.json"  # a supervisor's soft labels: {"train": [[p, ...], ...], "test": [...]}


@dataclass
class W2SModel:
    model: str = ""
    """A model dir or an lmforge run dir (its ``model/``): any family's pretrained model."""
    overrides: list[str] = field(default_factory=list)
    """Fine-tuning ``key=value`` overrides for this model's runs (``train.lr=…``, ``peft.method=lora``, …)."""


@dataclass
class W2SConfig:
    run_dir: str = "runs/w2s"
    task: TaskConfig = field(default_factory=TaskConfig)
    """A classification task: world (``task.name``) or your files (``task.train``/``validation``/``test``)."""
    n_weak: int = 500
    """Split A: training examples whose ground truth fine-tunes the weak model."""
    n_student: int = 1000
    """Split B: training examples the weak model labels for the student (and whose ground truth trains the
    ceiling)."""
    weak: W2SModel = field(default_factory=W2SModel)
    strong: W2SModel = field(default_factory=W2SModel)
    chain: list[str] = field(default_factory=list)
    """Intermediate models for bootstrapping (weak → chain[0] → … → strong), each with the strong's overrides."""
    chain_loss: str = "logconf"
    losses: list[str] = field(default_factory=lambda: ["ce", "logconf"])
    aux_coef: float = 0.5
    """logconf: the final weight of the student's own hardened predictions (the paper's 0.5)."""
    warmup_frac: float = 0.1
    """logconf: the share of training over which the weight ramps up (the paper's 0.1)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    finetune: list[str] = field(default_factory=list)
    """Fine-tuning overrides for every run (``max_steps=…``, ``train.global_batch_size=…``), before the model's."""
    bootstrap: int = 1000
    """Resamples of the test examples for the intervals."""
    confidence: float = 0.95

    def __post_init__(self) -> None:
        require(self.n_weak >= 2, "n_weak", self.n_weak, ">= 2")
        require(self.n_student >= 2, "n_student", self.n_student, ">= 2")
        require(bool(self.seeds), "seeds", self.seeds, "a non-empty list")
        require(bool(self.losses) and all(l in LOSSES for l in self.losses), "losses", self.losses,
                f"a non-empty list of {', '.join(LOSSES)}")
        require(self.chain_loss in LOSSES, "chain_loss", self.chain_loss, f"one of {', '.join(LOSSES)}")
        require(0.0 <= self.aux_coef <= 1.0, "aux_coef", self.aux_coef, "in [0, 1]")
        require(0.0 <= self.warmup_frac <= 1.0, "warmup_frac", self.warmup_frac, "in [0, 1]")
        require(self.bootstrap >= 10, "bootstrap", self.bootstrap, ">= 10")
        require(0.5 < self.confidence < 1.0, "confidence", self.confidence, "in (0.5, 1)")
        for key, m in (("weak.model", self.weak.model), ("strong.model", self.strong.model)):
            if not m:
                raise ConfigError(f"{key} is not set; point it at a pretrained model dir or lmforge run dir")


# ---- data -----------------------------------------------------------------------------------------
def _plain(rec: dict[str, Any], label: str | None = None) -> dict[str, Any]:
    out = {"text": rec["text"], "label": rec["label"] if label is None else label}
    if "text_pair" in rec:
        out["text_pair"] = rec["text_pair"]
    return out


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # rewriting would not change the runs
        atomic_write_text(path, text)
    return path


def prepare_data(cfg: W2SConfig) -> dict[str, Any]:
    """Split the task's train split into A (weak's ground truth) and B (the student's), write the splits as
    task files under ``RUN_DIR/data``; return their paths, the labels and B's records."""
    task = load_task(cfg.task)
    if task.type != "classification":
        raise ConfigError(f"w2s needs a classification task; '{task.name}' is {task.type}")
    train, test = task.splits["train"], task.splits["test"]
    need = cfg.n_weak + cfg.n_student
    if need > len(train):
        more = " or raise task.n_train" if cfg.task.name else " or add training examples"
        raise DataError(f"n_weak={cfg.n_weak} + n_student={cfg.n_student} = {need} exceeds the task's "
                        f"{len(train)} training examples; lower them{more}")
    if not test:
        raise DataError(f"task '{task.name}' has no test split, which every w2s run is scored on; give task.test")
    if not task.splits["validation"]:
        raise DataError(f"task '{task.name}' has no validation split; give task.validation")
    order = list(range(len(train)))
    random.Random(f"w2s:{cfg.task.split_seed}").shuffle(order)
    split_a = [train[i] for i in sorted(order[:cfg.n_weak])]
    split_b = [train[i] for i in sorted(order[cfg.n_weak:need])]
    if len({r["label"] for r in split_a}) < 2:
        raise DataError(f"split A (n_weak={cfg.n_weak}) holds a single label; raise n_weak")
    data = Path(cfg.run_dir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {name: _write_jsonl(data / f"{name}.jsonl", [_plain(r) for r in recs])
             for name, recs in (("A", split_a), ("B", split_b), ("validation", task.splits["validation"]),
                                ("test", test))}
    return {"files": files, "labels": list(task.labels or []), "B": split_b, "test": test, "task": task.name,
            "description": task.description}


# ---- checks ---------------------------------------------------------------------------------------
def _classifier_labels(model_dir: Path) -> list[str] | None:
    cfg = read_json(model_dir / "config.json")
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs) or "id2label" not in cfg:
        return None
    return [cfg["id2label"][k] for k in sorted(cfg["id2label"], key=int)]


def _param_count(model_dir: Path) -> int:
    return sum(t.numel() for t in read_weights(model_dir).values())


def check_models(cfg: W2SConfig, labels: list[str]) -> dict[str, int]:
    """Each model's label set (a fine-tuned classifier must have the task's) and size: a strong model not larger
    than the weak one is warned about (weak-to-strong needs a stronger student), not refused."""
    sizes = {}
    for key, path in (("weak.model", cfg.weak.model), *((f"chain[{i}]", m) for i, m in enumerate(cfg.chain)),
                      ("strong.model", cfg.strong.model)):
        d = resolve_model_dir(path)
        own = _classifier_labels(d)
        if own is not None and own != labels:
            raise ConfigError(f"{key}='{path}' is a classifier with labels {own}, not the task's {labels}; use a "
                              f"model with the task's labels or its pretrained base model")
        sizes[key] = _param_count(d)
    if sizes["strong.model"] <= sizes["weak.model"]:
        print(f"warning: strong.model has {sizes['strong.model']:,} parameters, not more than weak.model's "
              f"{sizes['weak.model']:,}: the student is not stronger than its supervisor", file=sys.stderr, flush=True)
    return sizes


# ---- one run --------------------------------------------------------------------------------------
def _run(cfg: W2SConfig, run_dir: Path, seed: int, model: W2SModel, train_file: Path, data: dict[str, Any],
         plug: FinetunePlug) -> dict[str, Any]:
    """One fine-tuning run, or its results if it finished before with the same settings."""
    overrides = [*cfg.finetune, *model.overrides]
    ft = load_finetune_config(None, overrides)
    task = dataclasses.replace(TaskConfig(), name=None, train=str(train_file), validation=str(data["files"]["validation"]),
                               test=str(data["files"]["test"]), labels=list(data["labels"]),
                               max_length=cfg.task.max_length)
    ft = dataclasses.replace(ft, run_dir=str(run_dir), seed=seed, model=model.model, task=task, resume="auto")
    settings = json.dumps({"finetune": to_dict(ft), "plug": plug.config}, sort_keys=True)
    done = run_dir / DONE_FILE
    if done.is_file() and done.read_text(encoding="utf-8") == settings:
        print(f"  {run_dir}: finished before, reused", file=sys.stderr, flush=True)
        return json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    res = finetune(ft, progress=False, plug=plug)
    atomic_write_text(done, settings)
    return res


def _probs_plug(data: dict[str, Any], records: list[dict[str, Any]], config: dict[str, Any]) -> FinetunePlug:
    """Final model kept; after training, the model's soft labels on ``records`` and on test go to PROBS_FILE."""
    def after(parts: FinetuneParts) -> dict[str, Any]:
        enc = parts.objective.encode
        probs = {"train": classification_probs(parts.model, parts.objective, [enc(r) for r in records],
                                               parts.cfg.eval_batch_size).tolist(),
                 "test": classification_probs(parts.model, parts.objective, [enc(r) for r in data["test"]],
                                              parts.cfg.eval_batch_size).tolist()}
        atomic_write_json(Path(parts.cfg.run_dir) / PROBS_FILE, probs)
        return {}
    return FinetunePlug(select=False, after=after, config=config)


def _student_plug(cfg: W2SConfig, loss: str, soft: list[list[float]], labels: list[str],
                  then_label: list[dict[str, Any]] | None, data: dict[str, Any]) -> FinetunePlug:
    def objective(base: Any) -> SoftLabelObjective:
        return SoftLabelObjective(base, len(labels), loss, cfg.aux_coef, cfg.warmup_frac)

    def train_examples(examples: list[Any]) -> list[Any]:
        if len(examples) != len(soft):
            raise DataError(f"{len(examples)} student examples but {len(soft)} soft labels; delete the w2s run "
                            f"dir's seed directories and rerun")
        return [{**e, "soft": s} for e, s in zip(examples, soft)]

    config = {"loss": loss, "aux_coef": cfg.aux_coef, "warmup_frac": cfg.warmup_frac,
              "soft_labels": _digest(soft)}
    base = _probs_plug(data, then_label, config) if then_label is not None else FinetunePlug(select=False,
                                                                                          config=config)
    return dataclasses.replace(base, objective=objective, train_examples=train_examples)


def _digest(x: Any) -> str:
    return hashlib.sha256(json.dumps(x).encode()).hexdigest()[:16]


def _labelled_file(path: Path, records: list[dict[str, Any]], probs: list[list[float]], labels: list[str]) -> Path:
    """``records`` with a supervisor's hard labels (argmax of its soft labels) as the task file's labels."""
    return _write_jsonl(path, [_plain(r, labels[int(np.argmax(p))]) for r, p in zip(records, probs)])


def _test_correct(run_dir: Path) -> tuple[np.ndarray, list[str]]:
    rows = [json.loads(l) for l in (run_dir / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines() if l]
    preds = [r["prediction"] for r in rows]
    return np.array([r["prediction"] == r["gold"] for r in rows], dtype=float), preds


def _student_dir(cfg: W2SConfig, loss: str) -> str:
    """``strong-<loss>``; the confidence loss at other than the paper's settings gets a directory of its own."""
    if loss == "logconf" and (cfg.aux_coef, cfg.warmup_frac) != (0.5, 0.1):
        return f"strong-logconf-a{cfg.aux_coef:g}-w{cfg.warmup_frac:g}"
    return f"strong-{loss}"


def run_seed(cfg: W2SConfig, data: dict[str, Any], seed: int) -> dict[str, Any]:
    root = Path(cfg.run_dir) / f"seed{seed}"
    labels, records_b, files = data["labels"], data["B"], data["files"]
    say = lambda what: print(f"[seed {seed}] {what}", file=sys.stderr, flush=True)  # noqa: E731
    say("weak supervisor on the ground truth of A")
    weak_dir = root / "weak"
    _run(cfg, weak_dir, seed, cfg.weak, files["A"], data, _probs_plug(data, records_b, {"role": "weak"}))
    weak_probs = json.loads((weak_dir / PROBS_FILE).read_text(encoding="utf-8"))
    soft_b = weak_probs["train"]
    weak_file = _labelled_file(root / "B-weak.jsonl", records_b, soft_b, labels)
    runs = {"weak": weak_dir}
    for loss in cfg.losses:
        say(f"strong student on the weak labels of B ({loss})")
        runs[f"w2s-{loss}"] = root / _student_dir(cfg, loss)
        _run(cfg, runs[f"w2s-{loss}"], seed, cfg.strong, weak_file, data,
             _student_plug(cfg, loss, soft_b, labels, None, data))
    say("strong ceiling on the ground truth of B")
    runs["ceiling"] = root / "ceiling"
    _run(cfg, runs["ceiling"], seed, cfg.strong, files["B"], data, FinetunePlug(select=False,
                                                                                config={"role": "ceiling"}))
    if cfg.chain:
        runs[f"bootstrap-{cfg.chain_loss}"] = _chain(cfg, data, seed, root, say)
    out: dict[str, Any] = {"seed": seed, "runs": {k: str(v) for k, v in runs.items()}}
    correct, preds = {}, {}
    for name, d in runs.items():
        correct[name], preds[name] = _test_correct(d)
    out["accuracy"] = {k: float(v.mean()) for k, v in correct.items()}
    weak_wrong = correct["weak"] == 0
    out["agreement"] = {}
    for name in runs:
        if name == "weak":
            continue
        same = np.array([a == b for a, b in zip(preds[name], preds["weak"])], dtype=float)
        out["agreement"][name] = {"all": float(same.mean()),
                                  "weak_wrong": float(same[weak_wrong].mean()) if weak_wrong.any() else None}
    out["_correct"] = correct
    return out


def _chain(cfg: W2SConfig, data: dict[str, Any], seed: int, root: Path, say: Any) -> Path:
    """Bootstrapping: B cut into len(chain) + 1 disjoint parts; the weak model labels part 0, the first
    intermediate trains on it and labels part 1, …, the strong model trains on the last part's labels."""
    labels, records_b = data["labels"], data["B"]
    parts = np.array_split(np.arange(len(records_b)), len(cfg.chain) + 1)
    if min(len(p) for p in parts) < 2:
        raise DataError(f"n_student={cfg.n_student} is too small to cut into {len(parts)} chain parts; raise it")
    subsets = [[records_b[i] for i in p] for p in parts]
    # the weak model's labels of part 0: its soft labels of B, restricted (same model, same examples)
    soft_all = json.loads((root / "weak" / PROBS_FILE).read_text(encoding="utf-8"))["train"]
    soft = [soft_all[i] for i in parts[0]]
    models = [W2SModel(m, list(cfg.strong.overrides)) for m in cfg.chain] + [cfg.strong]
    run_dir = root
    for k, model in enumerate(models):
        last = k == len(models) - 1
        run_dir = root / f"chain{k}"
        say(f"bootstrap step {k + 1}/{len(models)}: {model.model} on its supervisor's labels ({cfg.chain_loss})")
        train_file = _labelled_file(root / f"chain{k}-train.jsonl", subsets[k], soft, labels)
        _run(cfg, run_dir, seed, model, train_file, data,
             _student_plug(cfg, cfg.chain_loss, soft, labels, None if last else subsets[k + 1], data))
        if not last:
            soft = json.loads((run_dir / PROBS_FILE).read_text(encoding="utf-8"))["train"]
    return run_dir


# ---- summary --------------------------------------------------------------------------------------
def pgr(w2s: float, weak: float, ceiling: float) -> float | None:
    """Performance gap recovered, (w2s − weak) / (ceiling − weak); None when the ceiling does not beat weak."""
    gap = ceiling - weak
    return (w2s - weak) / gap if gap > 0 else None


def summarize(cfg: W2SConfig, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed PGR, its median over seeds, and percentile intervals from a paired bootstrap over test examples
    (one resample of the test indices shared by every model and seed)."""
    students = [k for k in seeds[0]["accuracy"] if k not in ("weak", "ceiling")]
    n = len(seeds[0]["_correct"]["weak"])
    rng = np.random.default_rng(0)
    lo_q, hi_q = (1 - cfg.confidence) / 2 * 100, (1 + cfg.confidence) / 2 * 100
    boot: dict[str, list[list[float]]] = {name: [] for name in ["weak", "ceiling", *students]}
    boot_pgr: dict[str, list[list[float]]] = {s: [] for s in students}
    for _ in range(cfg.bootstrap):
        idx = rng.integers(0, n, n)
        accs = [{k: float(v[idx].mean()) for k, v in s["_correct"].items()} for s in seeds]
        for name in boot:
            boot[name].append([a[name] for a in accs])
        for s in students:
            boot_pgr[s].append([pgr(a[s], a["weak"], a["ceiling"]) for a in accs])

    def interval(values: list[float]) -> list[float] | None:
        vals = [v for v in values if v is not None]
        return [float(np.percentile(vals, lo_q)), float(np.percentile(vals, hi_q))] if vals else None

    def med(row: list[Any]) -> float | None:
        vals = [v for v in row if v is not None]
        return float(statistics.median(vals)) if vals else None

    rows = []
    for name in boot:
        per_seed = [s["accuracy"][name] for s in seeds]
        rows.append({"model": name, "accuracy_per_seed": per_seed, "accuracy_median": med(per_seed),
                     "accuracy_interval": interval([med(r) for r in boot[name]])})
    pgr_rows = []
    for s in students:
        per_seed = [pgr(x["accuracy"][s], x["accuracy"]["weak"], x["accuracy"]["ceiling"]) for x in seeds]
        pgr_rows.append({"student": s, "pgr_per_seed": per_seed, "pgr_median": med(per_seed),
                         "pgr_interval": interval([med(r) for r in boot_pgr[s]]),
                         "pgr_interval_per_seed": [interval([r[i] for r in boot_pgr[s]]) for i in range(len(seeds))],
                         "agreement_with_weak": [x["agreement"][s] for x in seeds]})
    return {"accuracy": rows, "pgr": pgr_rows, "test_examples": n, "bootstrap": cfg.bootstrap,
            "confidence": cfg.confidence}


def w2s(cfg: W2SConfig) -> dict[str, Any]:
    """Run (or reuse) every seed's runs and write ``RUN_DIR/w2s.json``; return the summary.

    Each fine-tuning run takes its own dir's lock, not the whole RUN_DIR: seeds can run side by side in processes of
    their own (``seeds=[k]`` each; the data files they write are identical), and one more call with every seed
    then reuses them all and summarises."""
    data = prepare_data(cfg)
    uses = set(cfg.losses) | ({cfg.chain_loss} if cfg.chain else set())
    if "logconf" in uses and len(data["labels"]) != 2:  # before any training (the objective refuses it too)
        raise ConfigError(f"the auxiliary confidence loss (logconf) is binary, as the paper's; task "
                          f"'{data['task']}' has {len(data['labels'])} labels — use losses=[ce] or a two-label task")
    sizes = check_models(cfg, data["labels"])
    seeds = [run_seed(cfg, data, seed) for seed in cfg.seeds]
    out = {"run_dir": cfg.run_dir, "task": data["task"], "description": data["description"],
           "labels": data["labels"], "n_weak": cfg.n_weak, "n_student": cfg.n_student,
           "weak_model": cfg.weak.model, "strong_model": cfg.strong.model, "chain": list(cfg.chain),
           "parameters": sizes, "losses": list(cfg.losses), "aux_coef": cfg.aux_coef,
           "warmup_frac": cfg.warmup_frac, "seeds": list(cfg.seeds), **summarize(cfg, seeds),
           "per_seed": [{k: v for k, v in s.items() if not k.startswith("_")} for s in seeds]}
    atomic_write_json(Path(cfg.run_dir) / "w2s.json", out)
    return out


def load_w2s_config(config_path: Optional[str], overrides: list[str]) -> W2SConfig:
    config_path, overrides = split_config_arg(config_path, overrides)
    return load_config(W2SConfig, config_path, overrides)


def run_w2s(config_path: Optional[str], overrides: list[str]) -> dict[str, Any]:
    return w2s(load_w2s_config(config_path, overrides))
