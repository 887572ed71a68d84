"""The hostile-input corpus: bad inputs and faults a new or careless user meets, across every command — config
values, data files, model dirs, adapters, run dirs, generation flags, signals, a full disk.  Each case asserts
what :mod:`tests.faults` asserts for every refusal: a non-zero exit, exactly one ``error:`` line without a
traceback (naming the culprit: each case lists fragments of that line), and every file that existed before —
the shared fixtures and the case's own files — byte-identical afterwards.  A case marked ``fresh`` (a bad config
value) also leaves its run dir uncreated: the config layer refused it before anything was written; any other
refused run leaves at most a run dir that a re-run takes over (``config.yaml`` alone, no metrics or checkpoints).

Fast by construction: the fixtures (random transformers checkpoints, one 2-step LoRA fine-tuning run that gives
a run dir with a checkpoint, a merged classifier and a PEFT adapter) are built once per module; every case runs
in this process (``tests.conftest.cli``) and fails before any training step.

Adding cases: write a function returning a list of :class:`Case` and append it to ``CASE_BUILDERS`` (the other
issue-22 features — guarded outputs, the run-dir lock, checkpoint fallback, non-finite steps — add theirs there).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.rundir import has_run
from tests.conftest import ROOT, cli, run_cli
from tests.faults import assert_refused, assert_unchanged, hashes

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [f"the review {i} says it was {w}" for i, w in enumerate(["good", "bad", "lovely", "awful"] * 30)]
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.vocab_size=300", "model.max_seq_len=32",
        "data.seq_len=16", "data.world_bytes=20000", "tokenizer.train_bytes=20000", "train.global_batch_size=4",
        "train.tensorboard=false", "max_steps=2"]


@dataclass
class Fixtures:
    root: Path
    gpt2: Path  # a random transformers GPT-2 checkpoint with an lmforge tokenizer
    llama: Path
    bert: Path
    run: Path  # a finished 2-step LoRA fine-tuning run of gpt2: checkpoints/, adapter/, model/ (merged classifier)
    cls: Path  # classification records (text, label)
    text: Path  # a plain text file

    @property
    def classifier(self) -> Path:
        return self.run / "model"

    @property
    def adapter(self) -> Path:
        return self.run / "adapter"


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Fixtures, Path], list[str]]
    """The command line, given the fixtures and the case's own empty directory (where it may write files first)."""
    expect: tuple[str, ...] = ()
    """Fragments of the one error line (case-folded)."""
    fresh: bool = False
    """The run dir ``{tmp}/run`` must not exist afterwards: the refusal came before anything was written."""
    root_ok: bool = True
    """False: the fault needs file permissions, which root ignores (skipped as root, with the reason)."""
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    """A fault injected into this process before the command runs (a full disk)."""
    trains: bool = False
    """The fault strikes after training started: the run dir keeps a checkpoint that resume=true continues from."""


def case(id: str, argv, *expect: str, **kw) -> Case:
    return Case(id, argv, tuple(expect), **kw)


def pretrain(*overrides: str) -> Callable[[Fixtures, Path], list[str]]:
    return lambda fx, tmp: ["pretrain", str(ROOT / "configs/tiny-gpt2.yaml"), f"run_dir={tmp / 'run'}", *TINY,
                            *overrides]


def finetune(*overrides: str, model: str = "gpt2") -> Callable[[Fixtures, Path], list[str]]:
    return lambda fx, tmp: ["finetune", f"run_dir={tmp / 'run'}", f"model={getattr(fx, model)}", "task.name=null",
                            f"task.train={fx.cls}", "max_steps=2", "train.global_batch_size=4",
                            "train.tensorboard=false", *overrides]


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def a_file(tmp: Path) -> Path:
    """A regular file: a path below it cannot be created, whoever runs the test (root included)."""
    return write(tmp / "plain-file", "not a directory\n")


def copy_model(src: Path, tmp: Path, name: str = "m") -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------------
# config values
# --------------------------------------------------------------------------------------------------


def train_value_cases() -> list[Case]:
    """Every numeric train.* value torch would reject (or that would silently train nonsense)."""
    bad = [("lr=nan", "train.lr"), ("lr=inf", "train.lr"), ("lr=-1e-3", "train.lr"), ("lr=0", "train.lr"),
           ("lr=fast", "train.lr"), ("betas=[0.9,1.5]", "train.betas"), ("betas=[-0.1,0.9]", "train.betas"),
           ("betas=[0.9]", "train.betas"), ("betas=[nan,0.9]", "train.betas"), ("betas=0.9", "train.betas"),
           ("eps=-1e-8", "train.eps"), ("eps=nan", "train.eps"), ("weight_decay=-0.1", "train.weight_decay"),
           ("weight_decay=nan", "train.weight_decay"), ("grad_clip=nan", "train.grad_clip"),
           ("grad_clip=-1", "train.grad_clip"), ("min_lr_ratio=-0.5", "train.min_lr_ratio"),
           ("min_lr_ratio=2", "train.min_lr_ratio"), ("min_lr_ratio=nan", "train.min_lr_ratio"),
           ("decay_fraction=1.5", "train.decay_fraction"), ("decay_fraction=nan", "train.decay_fraction"),
           ("warmup_steps=-1", "train.warmup_steps"), ("global_batch_size=0", "train.global_batch_size"),
           ("micro_batch_size=0", "train.micro_batch_size"), ("micro_batch_size=3", "train.micro_batch_size"),
           ("log_every=0", "train.log_every"), ("ckpt_every=-1", "train.ckpt_every"),
           ("keep_last=-1", "train.keep_last"), ("eval_every=-5", "train.eval_every"),
           ("schedule=cosin", "train.schedule"), ("optimizer=sgd", "train.optimizer"),
           ("precision=fp8", "train.precision"), ("fused_adamw=maybe", "train.fused_adamw"),
           ("param_lr={wte: nan}", "train.param_lr"), ("param_lr={wte: -1}", "train.param_lr"),
           ("compile=2", "train.compile"), ("global_batch_size=2.5", "train.global_batch_size"),
           ("device=tpu", "tpu")]
    return [case(f"pretrain-train.{kv}", pretrain(f"train.{kv}"), key, fresh=True) for kv, key in bad]


def run_value_cases() -> list[Case]:
    bad = [("max_steps=-1", "max_steps"), ("max_steps=ten", "max_steps"), ("max_steps=[3]", "max_steps"),
           ("seed=-1", "seed"), ("seed=1.5", "seed"), ("resume=maybe", "resume"),
           ("model.n_layer=0", "n_layer"), ("model.n_head=3", "n_head"), ("model.d_model=-32", "d_model"),
           ("model.vocab_size=0", "vocab_size"), ("model.max_seq_len=0", "max_seq_len"),
           ("model.dropout=1.5", "dropout"), ("model.dropout=nan", "dropout"), ("model.family=gpt3", "model.family"),
           ("data.seq_len=0", "data.seq_len"), ("data.seq_len=4096", "data.seq_len"),
           ("data.val_fraction=1.5", "data.val_fraction"), ("data.val_fraction=-0.1", "data.val_fraction"),
           ("data.val_fraction=nan", "data.val_fraction"), ("data.num_workers=-1", "data.num_workers"),
           ("data.world_bytes=0", "data.world_bytes"), ("tokenizer.train_bytes=0", "tokenizer.train_bytes"),
           ("tokenizer.vocab_size=10", "vocab"), ("distributed.strategy=horovod", "distributed.strategy"),
           ("unknown_key=1", "unknown_key"), ("train.lrr=1", "did you mean 'lr'"), ("train=3", "train")]
    # checked with the model or the data at hand (after the run dir check): refused before any training step
    late = {"data.seq_len=4096", "tokenizer.vocab_size=10"}
    cases = [case(f"pretrain-{kv}", pretrain(kv), key, fresh=kv not in late) for kv, key in bad]
    cases += [
        case("pretrain-data.source-missing", lambda fx, tmp: pretrain(f"data.source={tmp / 'nope.txt'}")(fx, tmp),
             "nope.txt"),
        case("pretrain-tokenizer.path-missing", lambda fx, tmp: pretrain(f"tokenizer.path={tmp / 'tok'}")(fx, tmp),
             "tok"),
        case("pretrain-data.cache_dir-under-a-file",
             lambda fx, tmp: pretrain(f"data.cache_dir={a_file(tmp) / 'cache'}")(fx, tmp), "plain-file"),
        case("pretrain-run_dir-is-a-file", lambda fx, tmp: pretrain()(fx, tmp)[:2] + [f"run_dir={a_file(tmp)}",
             *TINY], "plain-file"),
        case("pretrain-run_dir-under-a-file", lambda fx, tmp: pretrain()(fx, tmp)[:2] + [
            f"run_dir={a_file(tmp) / 'run'}", *TINY], "plain-file"),
        case("pretrain-config-missing", lambda fx, tmp: ["pretrain", str(tmp / "nope.yaml")], "nope.yaml"),
        case("pretrain-config-not-yaml", lambda fx, tmp: ["pretrain", str(write(tmp / "c.yaml", "a: [1, 2\n"))],
             "c.yaml"),
        case("pretrain-config-binary", lambda fx, tmp: ["pretrain", str(write(tmp / "c.yaml", b"\xff\xfe\x00\x81"))],
             "c.yaml"),
        case("pretrain-config-a-list", lambda fx, tmp: ["pretrain", str(write(tmp / "c.yaml", "- 1\n- 2\n"))],
             "c.yaml"),
        case("pretrain-override-without-value", pretrain("train.lr"), "train.lr"),
        case("pipeline-bad-key", lambda fx, tmp: ["pipeline", f"run_dir={tmp / 'run'}", "pretrain.train.lr=nan"],
             "pretrain", fresh=True),
    ]
    return cases


def finetune_cases() -> list[Case]:
    bad = [("train.lr=nan", "train.lr"), ("train.betas=[0.9,1.5]", "train.betas"), ("peft.method=lorra", "lorra"),
           ("peft.method=lora peft.r=0", "peft.r"), ("peft.method=lora peft.alpha=nan", "peft.alpha"),
           ("peft.method=lora peft.dropout=1.5", "peft.dropout"),
           ("peft.method=lora peft.target_modules=[q_proj]", "q_proj"), ("peft.method=lora peft.layers=[99]", "99"),
           ("eval_batch_size=0", "eval_batch_size"), ("max_new_tokens=-1", "max_new_tokens"),
           ("head.dropout=2", "head.dropout"), ("init=scratch", "init"), ("task.type=regression", "task.type"),
           ("task.val_fraction=2", "task.val_fraction"), ("task.max_length=0", "task.max_length"),
           ("task.text_field=body", "body")]
    # peft.* and task fields are checked against the model and the data (after the run dir check)
    cases = [case(f"finetune-{kv}", finetune(*kv.split()), key, fresh=not kv.startswith(("peft.", "task.text")))
             for kv, key in bad]
    records = [
        ("missing", None, "nope.jsonl"), ("empty", b"", "records.jsonl"), ("binary", b"\x00\xff\x81\x92" * 50, "records"),
        ("latin-1", "caf\xe9 was good".encode("latin-1") + b"\n", "records"),
        ("truncated", b'{"text": "good", "label": "pos"}\n{"text": "ba', "records.jsonl:2"),
        ("no-label", b'{"text": "good"}\n{"text": "bad"}\n', "label"),
        ("text-not-a-string", b'{"text": 3, "label": "pos"}\n{"text": [1], "label": "neg"}\n', "records.jsonl"),
        ("json-array-of-numbers", b"[1, 2, 3]\n", "records"),
    ]
    for name, data, frag in records:
        def argv(fx, tmp, data=data):
            path = tmp / ("nope.jsonl" if data is None else "records.jsonl")
            if data is not None:
                write(path, data)
            return finetune(f"task.train={path}")(fx, tmp)
        cases.append(case(f"finetune-task-file-{name}", argv, frag))
    cases += [
        case("finetune-model-missing", lambda fx, tmp: finetune(f"model={tmp / 'nope'}")(fx, tmp), "nope"),
        case("finetune-model-is-an-adapter", finetune(model="adapter"), "adapter"),
        case("finetune-model-is-a-text-file", lambda fx, tmp: finetune(f"model={fx.text}")(fx, tmp), "text.txt"),
        case("finetune-resume-true-without-checkpoint", finetune("resume=true"), "resume=true"),
        case("finetune-into-an-existing-run", lambda fx, tmp: finetune(f"run_dir={fx.run}")(fx, tmp), "already"),
        case("finetune-resume-changed-config", lambda fx, tmp: finetune(f"run_dir={fx.run}", "resume=true",
                                                                        "train.lr=0.5")(fx, tmp), "train.lr"),
    ]
    return cases


# --------------------------------------------------------------------------------------------------
# model dirs, generation and evaluation flags
# --------------------------------------------------------------------------------------------------


def generate(model: str = "gpt2", *flags: str) -> Callable[[Fixtures, Path], list[str]]:
    return lambda fx, tmp: ["generate", "--model", str(getattr(fx, model)), "--prompt", "the review",
                            "--max-new-tokens", "4", *flags]


def broken_model_cases() -> list[Case]:
    """A gpt2 model dir with one file missing, truncated or replaced; each command that loads a model refuses."""
    def broken(how: Callable[[Path], object]) -> Callable[[Fixtures, Path], list[str]]:
        def argv(fx, tmp):
            m = copy_model(fx.gpt2, tmp)
            how(m)
            return ["generate", "--model", str(m), "--prompt", "hi"]
        return argv

    def truncate(name: str, keep: int = 100):
        return lambda m: write(m / name, (m / name).read_bytes()[:keep])

    def edit_config(**kv):
        def how(m):
            cfg = json.loads((m / "config.json").read_text())
            cfg.update(kv)
            write(m / "config.json", json.dumps(cfg))
        return how

    return [
        case("model-no-weights", broken(lambda m: (m / "model.safetensors").unlink()), "model.safetensors"),
        case("model-weights-truncated", broken(truncate("model.safetensors")), "model.safetensors"),
        case("model-weights-garbage", broken(lambda m: write(m / "model.safetensors", os.urandom(4096))),
             "model.safetensors"),
        case("model-weights-empty", broken(lambda m: write(m / "model.safetensors", b"")), "model.safetensors"),
        case("model-config-truncated", broken(truncate("config.json", 20)), "config.json"),
        case("model-config-binary", broken(lambda m: write(m / "config.json", b"\xff\xfe\x00")), "config.json"),
        case("model-config-a-list", broken(lambda m: write(m / "config.json", "[1, 2]")), "config.json"),
        case("model-config-no-model_type", broken(edit_config(model_type=None)), "model_type"),
        case("model-config-unknown-model_type", broken(edit_config(model_type="mamba")), "mamba"),
        case("model-config-n_embd-string", broken(edit_config(n_embd="wide")), "config.json"),
        case("model-config-negative-n_layer", broken(edit_config(n_layer=-2)), "n_layer"),
        case("model-config-n_head-not-dividing", broken(edit_config(n_head=3)), "n_head"),
        case("model-config-shape-mismatch", broken(edit_config(n_embd=64)), "m"),
        case("model-tokenizer-missing", broken(lambda m: (m / "tokenizer.json").unlink()), "tokenizer"),
        case("model-tokenizer-truncated", broken(truncate("tokenizer.json", 50)), "tokenizer.json"),
        case("model-tokenizer-binary", broken(lambda m: write(m / "tokenizer.json", os.urandom(300))),
             "tokenizer.json"),
        case("model-dir-empty", lambda fx, tmp: ["generate", "--model", str((tmp / "empty").mkdir() or tmp / "empty"),
                                                 "--prompt", "hi"], "empty"),
        case("model-dir-missing", lambda fx, tmp: ["generate", "--model", str(tmp / "nope"), "--prompt", "hi"], "nope"),
        case("model-is-a-file", lambda fx, tmp: ["generate", "--model", str(fx.text), "--prompt", "hi"], "text.txt"),
    ]


def generation_cases() -> list[Case]:
    flags = [("--max-new-tokens=-1", "max_new_tokens"), ("--temperature=-1", "temperature"),
             ("--temperature=nan", "temperature"), ("--temperature=inf", "temperature"), ("--top-k=-1", "top_k"),
             ("--top-p=0", "top_p"), ("--top-p=1.5", "top_p"), ("--top-p=nan", "top_p"),
             ("--repetition-penalty=0", "repetition_penalty"), ("--repetition-penalty=nan", "repetition_penalty"),
             ("--stop=", "stop"), ("--max-new-tokens=many", "--max-new-tokens"), ("--seed=1.5", "--seed"),
             ("--device=tpu", "tpu"), ("--bogus-flag", "--bogus-flag")]
    cases = [case(f"generate{flag}", generate("gpt2", flag), frag) for flag, frag in flags]
    cases += [
        case("generate-on-a-classifier", generate("classifier"), "classifier", "generate"),
        case("generate-on-an-adapter", generate("adapter"), "adapter"),
        case("generate-on-a-bert", generate("bert"), "bert"),
        case("generate-on-a-run-dir-without-model", lambda fx, tmp: ["generate", "--model", str(
            shutil.copytree(fx.run / "checkpoints", tmp / "run" / "checkpoints") and tmp / "run"), "--prompt", "hi"],
             "run"),
        case("generate-empty-prompt", lambda fx, tmp: ["generate", "--model", str(fx.gpt2), "--prompt", ""], "prompt"),
        case("generate-prompt-longer-than-context", lambda fx, tmp: [
            "generate", "--model", str(fx.gpt2), "--prompt", "good " * 200], "64"),
        case("generate-no-prompt", lambda fx, tmp: ["generate", "--model", str(fx.gpt2)], "--prompt"),
    ]
    return cases


def perplexity(model: str = "gpt2", *flags: str) -> Callable[[Fixtures, Path], list[str]]:
    return lambda fx, tmp: ["eval", "perplexity", "--model", str(getattr(fx, model)), "--data", str(fx.text), *flags]


def eval_cases() -> list[Case]:
    flags = [("--max-length=0", "max_length"), ("--max-length=-8", "max_length"), ("--max-length=100000", "max_length"),
             ("--stride=0", "stride"), ("--stride=-1", "stride"), ("--stride=1000", "stride"),
             ("--batch-size=0", "--batch-size"), ("--max-docs=0", "--max-docs"), ("--max-docs=-1", "--max-docs"),
             ("--max-docs=all", "--max-docs"), ("--device=cuda:99", "cuda")]
    cases = [case(f"perplexity{flag}", perplexity("gpt2", flag), frag) for flag, frag in flags]
    data = [("missing", None, "nope.txt"), ("empty", b"", "data.txt"), ("blank-lines", b"\n\n \n", "data.txt"),
            ("binary", os.urandom(2000), "data.txt"), ("latin-1", "caf\xe9 au lait\n".encode("latin-1"), "data.txt")]
    for name, content, frag in data:
        def argv(fx, tmp, content=content):
            path = tmp / ("nope.txt" if content is None else "data.txt")
            if content is not None:
                write(path, content)
            return ["eval", "perplexity", "--model", str(fx.gpt2), "--data", str(path)]
        cases.append(case(f"perplexity-data-{name}", argv, frag))
    jsonl = [("field-missing", b'{"body": "good"}\n', "text"), ("truncated", b'{"text": "good"}\n{"text": "go', ":2"),
             ("not-json", b"hello there\n", "data.jsonl"), ("gz-corrupt", None, "data.jsonl.gz")]
    for name, content, frag in jsonl:
        def argv(fx, tmp, content=content):
            path = write(tmp / "data.jsonl.gz", b"\x1f\x8b\x08garbage") if content is None else \
                write(tmp / "data.jsonl", content)
            return ["eval", "perplexity", "--model", str(fx.gpt2), "--data", str(path)]
        cases.append(case(f"perplexity-jsonl-{name}", argv, frag))
    cases += [
        case("perplexity-on-a-classifier", perplexity("classifier"), "classifier", "eval perplexity"),
        case("perplexity-on-an-adapter", perplexity("adapter"), "adapter"),
        case("perplexity-csv-without-the-field", lambda fx, tmp: [
            "eval", "perplexity", "--model", str(fx.gpt2), "--data", str(write(tmp / "d.csv", "a,b\n1,2\n"))], "text"),
        case("perplexity-parquet-garbage", lambda fx, tmp: [
            "eval", "perplexity", "--model", str(fx.gpt2), "--data", str(write(tmp / "d.parquet", b"PAR1junk"))],
             "d.parquet"),
        case("fill-mask-on-gpt2", lambda fx, tmp: ["fill-mask", "--model", str(fx.gpt2), "--text", "a [MASK]"], "bert"),
        case("fill-mask-without-mask", lambda fx, tmp: ["fill-mask", "--model", str(fx.bert), "--text", "no mask"],
             "[MASK]"),
        case("fill-mask-top-k-0", lambda fx, tmp: ["fill-mask", "--model", str(fx.bert), "--text", "a [MASK]",
                                                   "--top-k", "0"], "top_k"),
        case("fill-mask-on-a-classifier", lambda fx, tmp: ["fill-mask", "--model", str(fx.classifier), "--text",
                                                           "a [MASK]"], "classifier"),
        case("eval-without-subcommand", lambda fx, tmp: ["eval"], "perplexity"),
    ]
    return cases


# --------------------------------------------------------------------------------------------------
# adapters and merge, tokenizer, world, bench
# --------------------------------------------------------------------------------------------------


def merge_argv(base: str, adapter: Callable[[Fixtures, Path], Path] | str = "adapter"):
    def argv(fx, tmp):
        path = adapter(fx, tmp) if callable(adapter) else getattr(fx, adapter)
        return ["merge", "--base", str(getattr(fx, base)), "--adapter", str(path), "--out", str(tmp / "merged")]
    return argv


def broken_adapter(how: Callable[[Path], object]) -> Callable[[Fixtures, Path], Path]:
    def build(fx, tmp):
        a = copy_model(fx.adapter, tmp, "adapter")
        how(a)
        return a
    return build


def merge_cases() -> list[Case]:
    return [
        case("merge-gpt2-adapter-on-llama", merge_argv("llama"), "gpt2", "llama"),
        case("merge-gpt2-adapter-on-bert", merge_argv("bert"), "gpt2", "bert"),
        case("merge-adapter-missing", merge_argv("gpt2", lambda fx, tmp: tmp / "nope"), "nope"),
        case("merge-adapter-dir-empty", merge_argv("gpt2", lambda fx, tmp: (tmp / "a").mkdir() or tmp / "a"), "a"),
        case("merge-adapter-is-a-model", merge_argv("gpt2", lambda fx, tmp: fx.gpt2), "adapter"),
        case("merge-base-is-an-adapter", lambda fx, tmp: merge_argv("adapter")(fx, tmp), "adapter"),
        case("merge-adapter-config-truncated", merge_argv("gpt2", broken_adapter(
            lambda a: write(a / "adapter_config.json", (a / "adapter_config.json").read_bytes()[:30]))),
             "adapter_config.json"),
        case("merge-adapter-weights-truncated", merge_argv("gpt2", broken_adapter(
            lambda a: write(a / "adapter_model.safetensors", (a / "adapter_model.safetensors").read_bytes()[:64]))),
             "adapter_model.safetensors"),
        case("merge-adapter-weights-missing", merge_argv("gpt2", broken_adapter(
            lambda a: (a / "adapter_model.safetensors").unlink())), "adapter_model.safetensors"),
        case("merge-adapter-meta-garbage", merge_argv("gpt2", broken_adapter(
            lambda a: write(a / "lmforge_delta.json", b"\xff\x00"))), "lmforge_delta.json"),
        case("merge-adapter-rank-edited", merge_argv("gpt2", broken_adapter(lambda a: write(
            a / "adapter_config.json", json.dumps({**json.loads((a / "adapter_config.json").read_text()), "r": 16})))),
             "adapter"),
        case("merge-out-under-a-file", lambda fx, tmp: ["merge", "--base", str(fx.gpt2), "--adapter", str(fx.adapter),
                                                        "--out", str(a_file(tmp) / "merged")], "plain-file"),
    ]


def tokenizer_world_bench_cases() -> list[Case]:
    def tok(*flags):
        return lambda fx, tmp: ["tokenizer", "train", "--data", str(fx.text), "--out", str(tmp / "tok"), *flags]
    return [
        case("tokenizer-vocab-0", tok("--vocab-size", "0"), "vocab"),
        case("tokenizer-vocab-negative", tok("--vocab-size", "-5"), "vocab"),
        case("tokenizer-vocab-huge", tok("--vocab-size", str(10 ** 12)), "vocab"),
        case("tokenizer-max-bytes-0", tok("--max-bytes", "0"), "max-bytes"),
        case("tokenizer-max-bytes-negative", tok("--max-bytes", "-1"), "max-bytes"),
        case("tokenizer-data-binary", lambda fx, tmp: ["tokenizer", "train", "--data", str(
            write(tmp / "bin.txt", os.urandom(3000))), "--out", str(tmp / "tok")], "bin.txt"),
        case("tokenizer-field-missing", lambda fx, tmp: ["tokenizer", "train", "--data", str(fx.cls), "--field", "body",
                                                         "--out", str(tmp / "tok")], "body"),
        case("tokenizer-out-under-a-file", lambda fx, tmp: ["tokenizer", "train", "--data", str(fx.text), "--out",
                                                            str(a_file(tmp) / "tok")], "plain-file"),
        case("tokenizer-without-subcommand", lambda fx, tmp: ["tokenizer"], "tokenizer train"),
        case("world-bytes-0", lambda fx, tmp: ["world", "--out", str(tmp / "w.jsonl"), "--bytes", "0"], "bytes"),
        case("world-bytes-negative", lambda fx, tmp: ["world", "--out", str(tmp / "w.jsonl"), "--bytes", "-1"], "bytes"),
        case("world-out-is-a-dir", lambda fx, tmp: ["world", "--out", str(tmp), "--bytes", "1000"], str("directory")),
        case("world-out-under-a-file", lambda fx, tmp: ["world", "--out", str(a_file(tmp) / "w.jsonl"), "--bytes",
                                                        "1000"], "plain-file"),
        case("bench-methods-bogus", lambda fx, tmp: ["bench", "peft", f"run_dir={tmp / 'run'}", "methods=[lorra]"],
             "lorra", fresh=True),
        case("bench-seeds-empty", lambda fx, tmp: ["bench", "peft", f"run_dir={tmp / 'run'}", "seeds=[]"], "seeds",
             fresh=True),
        case("bench-without-subcommand", lambda fx, tmp: ["bench"], "bench peft"),
        case("unknown-command", lambda fx, tmp: ["pretrian"], "pretrian"),
    ]


# --------------------------------------------------------------------------------------------------
# run dirs and a full disk
# --------------------------------------------------------------------------------------------------


def run_dir_cases() -> list[Case]:
    def copied_run(edit: Callable[[Path], object], *overrides: str):
        def argv(fx, tmp):
            run = copy_model(fx.run, tmp, "run")
            edit(run)
            return finetune(f"run_dir={run}", *overrides)(fx, tmp)
        return argv

    return [
        case("run-config-yaml-corrupt", copied_run(lambda r: write(r / "config.yaml", "a: [1\n"), "resume=true"),
             "config.yaml"),
        case("run-config-yaml-binary", copied_run(lambda r: write(r / "config.yaml", b"\xff\xfe\x00"), "resume=true"),
             "config.yaml"),
        case("run-resume-true-checkpoints-removed", copied_run(lambda r: shutil.rmtree(r / "checkpoints"),
                                                               "resume=true"), "no complete checkpoint"),
        case("run-dir-unwritable", lambda fx, tmp: (os.chmod((tmp / "ro").mkdir() or tmp / "ro", 0o500), pretrain(
            f"run_dir={tmp / 'ro' / 'run'}")(fx, tmp))[1], "not writable", root_ok=False),
    ]


def _disk_full(monkeypatch: pytest.MonkeyPatch, exc: BaseException, module: str = "lmforge.models.model_dir",
               writer: str = "save_file", path_arg: int = 1) -> None:
    """The writer ``module`` uses (model dirs: safetensors' save_file(tensors, path)) fails from now on as a full
    disk does; ``path_arg``: where the path is among its arguments."""
    import importlib

    def fail(*args, **kwargs):
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, str(args[path_arg]))
        raise exc
    monkeypatch.setattr(importlib.import_module(module), writer, fail)


def disk_cases() -> list[Case]:
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    edquot = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    erofs = OSError(errno.EROFS, os.strerror(errno.EROFS))
    # what torch's zip writer says when the disk fills under torch.save
    unexpected_pos = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    merge = merge_argv("gpt2")
    return [
        case("merge-disk-full", merge, "no space", "merged", patch=lambda mp: _disk_full(mp, enospc)),
        case("merge-quota-exceeded", merge, "quota", patch=lambda mp: _disk_full(mp, edquot)),
        case("merge-read-only-fs", merge, "read-only", patch=lambda mp: _disk_full(mp, erofs)),
        case("merge-serializer-unexpected-pos", merge, "disk", patch=lambda mp: _disk_full(mp, unexpected_pos)),
        case("finetune-export-disk-full", finetune("train.ckpt_every=1"), "no space", "model", "resume=true",
             patch=lambda mp: _disk_full(mp, enospc), trains=True),
        case("tokenizer-train-disk-full", lambda fx, tmp: ["tokenizer", "train", "--data", str(fx.text), "--vocab-size",
                                                           "300", "--out", str(tmp / "tok")], "no space", "tok",
             patch=lambda mp: _disk_full(mp, enospc, "lmforge.core.tokenizer", "atomic_write_text", 0)),
    ]


# the run-dir lock and checkpoint verification (issue 22, durable)
# --------------------------------------------------------------------------------------------------

_held_locks: list[int] = []  # fds of the locks the lock cases hold (freed when the test process ends)


def locked_run(tmp: Path) -> Path:
    """``tmp/run`` locked as a live run holds it: a second open file description of ``.lock`` with an exclusive
    flock conflicts with the command's own, even in this process (flock locks belong to the open file)."""
    import fcntl

    from lmforge.train.runlock import LOCK_FILE

    run = tmp / "run"
    run.mkdir()
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "command": "lmforge pretrain",
                             "started": "2026-01-01 00:00:00"}).encode())
    _held_locks.append(fd)
    return run


def durable_cases() -> list[Case]:
    def every_checkpoint_truncated(fx, tmp):
        run = copy_model(fx.run, tmp, "run")
        for weights in (run / "checkpoints").glob("step_*/model.safetensors"):
            weights.write_bytes(weights.read_bytes()[:100])
        return finetune(f"run_dir={run}", "resume=true")(fx, tmp)

    return [
        case("run-dir-locked-pretrain", lambda fx, tmp: locked_run(tmp) and pretrain()(fx, tmp),
             "is in use by pid 4242 on elsewhere"),
        case("run-dir-locked-finetune-resume-true",
             lambda fx, tmp: locked_run(tmp) and finetune("resume=true")(fx, tmp), "is in use by pid 4242"),
        case("run-dir-locked-finetune-resume-auto",
             lambda fx, tmp: locked_run(tmp) and finetune("resume=auto")(fx, tmp), "is in use by pid 4242"),
        case("run-resume-true-every-checkpoint-truncated", every_checkpoint_truncated, "no complete checkpoint",
             "is bad", "model.safetensors"),
    ]


# Other engineers' issue-22 cases go here: one builder per feature, each returning a list of Case.
CASE_BUILDERS: list[Callable[[], list[Case]]] = [
    train_value_cases, run_value_cases, finetune_cases, broken_model_cases, generation_cases, eval_cases,
    merge_cases, tokenizer_world_bench_cases, run_dir_cases, disk_cases, durable_cases,
]
CASES = [c for build in CASE_BUILDERS for c in build()]


def test_the_corpus_is_large_and_its_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) >= 100 and len(set(ids)) == len(ids), [i for i in ids if ids.count(i) > 1]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixtures:
    import torch

    from lmforge.core.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    tok = Tokenizer.train(TEXTS, vocab_size=300, special_tokens=["<|endoftext|>"])
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id)).save_pretrained(root / "gpt2")
    tok.save(root / "gpt2")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id)).save_pretrained(root / "llama")
    tok.save(root / "llama")
    btok = Tokenizer.train(TEXTS, vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=btok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=btok.pad_id)).save_pretrained(root / "bert")
    btok.save(root / "bert")
    rows = [{"text": t, "label": "pos" if any(w in t for w in ("good", "lovely")) else "neg"} for t in TEXTS]
    cls = write(root / "cls.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    text = write(root / "text.txt", "\n\n".join(TEXTS[:20]) + "\n")
    run = root / "run"
    proc = run_cli("finetune", f"run_dir={run}", f"model={root / 'gpt2'}", "task.name=null", f"task.train={cls}",
                   "peft.method=lora", "peft.r=2", "max_steps=2", "train.global_batch_size=4", "train.ckpt_every=1",
                   "train.tensorboard=false", "eval_batch_size=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Fixtures(root, root / "gpt2", root / "llama", root / "bert", run, cls, text)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_hostile(c: Case, fx: Fixtures, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if not c.root_ok and os.geteuid() == 0:
        pytest.skip("root ignores file permissions; the same refusal is covered by the under-a-file cases")
    argv = c.argv(fx, tmp_path)
    new_run = not (tmp_path / "run").exists()
    before = hashes(fx.root, tmp_path)
    if c.patch is not None:
        c.patch(monkeypatch)
    proc = cli(*argv)
    assert_refused(proc, *c.expect)
    assert_unchanged(before)
    if c.fresh:
        assert not (tmp_path / "run").exists(), sorted(p.name for p in (tmp_path / "run").iterdir())
    if c.trains:
        assert latest_checkpoint(tmp_path / "run") is not None
    elif new_run:
        assert not has_run(tmp_path / "run"), "a refused run left a run dir that a re-run cannot take over"


def test_sigint_during_training_is_one_line_and_exit_130(fx: Fixtures, tmp_path: Path):
    """Ctrl-C in the middle of a run: exit 130, one line saying how to go on, the checkpoints already saved kept."""
    run = tmp_path / "run"
    done = threading.Event()

    def interrupt_once_training():
        while not done.is_set():
            # after the first complete checkpoint: before it, there is nothing for resume=true to continue from
            # (and the CLI says so); the metrics line alone came too early on a busy machine
            if run.is_dir() and latest_checkpoint(run) is not None:
                os.kill(os.getpid(), signal.SIGINT)
                return
            done.wait(0.05)

    watcher = threading.Thread(target=interrupt_once_training, daemon=True)
    watcher.start()
    try:
        proc = cli(*finetune("max_steps=100000", "train.log_every=1", "train.ckpt_every=1")(fx, tmp_path))
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert_refused(proc, "interrupted", "resume=true")
    # what the line says works: the run continues from the checkpoint it had when interrupted
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    again = cli(*finetune(f"max_steps={step + 1}", "train.log_every=1", "train.ckpt_every=1", "resume=true")(fx, tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] >= step + 1


def test_a_run_refused_at_its_first_step_is_taken_over_by_a_plain_rerun(fx: Fixtures, tmp_path: Path):
    """A refusal after config.yaml was written (here: a train.param_lr pattern that matches no parameter, found when
    the optimizer is built) leaves a run dir the corrected command, with the default resume=false, simply reuses."""
    bad = cli(*finetune("train.param_lr={no_such_param: 0.1}")(fx, tmp_path))
    assert_refused(bad, "no_such_param")
    assert (tmp_path / "run" / "config.yaml").is_file()  # it got as far as the run dir
    good = cli(*finetune()(fx, tmp_path))
    assert good.returncode == 0, good.stderr[-2000:]
    assert "no_such_param" not in (tmp_path / "run" / "config.yaml").read_text()
