"""`lmforge pipeline`: the life cycle so far, on the built-in world, in one run dir with one report.

Stages run in order and each contributes a section to ``RUN_DIR/report.md`` and its wall time:

1. data + tokenizer — the world corpus, a byte-level BPE trained on it, token shards;
2. pretrain — the decoder trained by the one Trainer (curves from metrics.jsonl);
3. eval — validation perplexity and bits-per-byte beside the unigram baseline of the same text (scored on
   ``RUN_DIR/validation.jsonl`` by the call ``lmforge eval perplexity`` makes; the report gives the command);
4. samples — greedy continuations of a few prompts;
   then in-context — zero/few-shot accuracy on world tasks by log-likelihood beside chance (decoders;
   ``apps/stage_incontext.py``);
5. finetune — the pretrained model fine-tuned on a world task (sentiment; T5: reading-comprehension QA)
   beside the task's majority and bag-of-words baselines.

Any model family pretrains (``model.family``: gpt2, llama, bert, t5, or a registered one); the eval and samples
stages follow the family's pretraining objective: perplexity vs a unigram model for causal LMs (gpt2, llama),
masked-token / next-sentence accuracy for masked LMs (bert) and target-token accuracy for span corruption (t5)
beside majority-class baselines, and greedy continuations, fill-mask predictions or span infilling as samples.
The fine-tuning stage's settings follow the family's kind (decoder, encoder, encoder-decoder).

On stderr each stage opens with a banner (what it does, its ETA and the run's, estimated from pretraining's measured
speed) and the run closes naming the report and the model dirs; stdout's last line is the JSON summary.

Later stages (SFT, preferences, RL, in-context scoring) live in `lmforge/apps/stage_*.py` modules, each importing
only `lmforge/apps/stage.py` (Context, Stage, say); :data:`STAGES` lists them in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from lmforge.apps import stage_sft
from lmforge.apps.stage import Context, Stage, say, world_seed
from lmforge.apps.stage_incontext import STAGE as INCONTEXT_STAGE, PipelineInContextConfig
from lmforge.apps.report import (Report, finetune_section, markdown_table, plot_curves, read_metrics,
                                 write_finetune_report)
from lmforge.core.config import dump_yaml, load_config, split_config_arg
from lmforge.core.io import atomic_write_json, atomic_write_text
from lmforge.data.sources import iter_documents
from lmforge.data.tasks import TaskConfig
from lmforge.eval.fill_mask import fill_mask
from lmforge.eval.generate import GenerationConfig, generate_text
from lmforge.eval.generate_seq2seq import generate_seq2seq_text
from lmforge.eval.perplexity import perplexity, unigram_perplexity
from lmforge.models.families import family_of, get_family
from lmforge.recipes import pretrain as pretrain_recipe
from lmforge.recipes.finetune import FinetuneConfig, finetune, finetune_train_defaults
from lmforge.recipes.pretrain import PretrainConfig, paradigm_parts
from lmforge.train.distributed import require_single_process
from lmforge.train.runlock import training_run
from lmforge.train.logging import _fmt_duration as fmt_duration

DEFAULT_PROMPTS = [
    "There once was a fisher named",
    "Q: Who is the mayor of",
    "12 + 7 =",
]


# by pretraining objective; any other (causal_lm) continues DEFAULT_PROMPTS
OBJECTIVE_PROMPTS = {
    "mlm_nsp": ["There once was a [MASK] named Lanen Kraidal.", "The town is led by its [MASK].", "12 + 7 = [MASK]"],
    "span": ["There once was a <extra_id_0> named Lanen Kraidal who lived in <extra_id_1>.",
             "Q: Who is the mayor of <extra_id_0>?"],
}


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=list)
    """Empty: prompts suited to the family's pretraining objective (continuations, [MASK] sentences, T5
    sentinels)."""
    max_new_tokens: int = 48
    temperature: float = 0.0


def _pipeline_defaults() -> dict[str, Any]:
    """The tiny GPT-2-style model that trains on 2 CPU cores in a few minutes (configs/pipeline.yaml)."""
    return {
        "run_dir": "runs/pipeline",
        "max_steps": 400,
        "model": {"family": "gpt2", "vocab_size": 4096, "d_model": 192, "n_layer": 4, "n_head": 6,
                  "max_seq_len": 256},
        "data": {"seq_len": 128, "world_bytes": 6_000_000},
        "tokenizer": {"train_bytes": 2_000_000},
        "train": {"global_batch_size": 16, "lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.1,
                  "eval_every": 100, "eval_max_batches": 20, "ckpt_every": 200, "log_every": 10},
    }


@dataclass
class PipelineFinetuneConfig:
    """The pipeline's fine-tuning stage: the pretrained model on a world task (``lmforge finetune`` does more)."""

    enabled: bool = True
    task: str = "auto"
    """A world task; auto: world-sentiment (decoders and encoders: gpt2, llama, bert) or world-qa-context
    (encoder-decoders: t5)."""
    max_steps: Optional[int] = None
    lr: Optional[float] = None
    """None: the family's calibrated setting (:data:`FINETUNE_DEFAULTS`, as in configs/finetune-*.yaml)."""
    global_batch_size: int = 32
    n_train: int = 8000


# family kind -> (steps, peak lr) of the pipeline's fine-tuning stage, calibrated on the built-in families (gpt2 and
# llama; bert: post-LN BERT diverges at 1e-3; t5 follows configs/finetune-t5-qa.yaml: Adafactor's relative step
# (1e-2), the tied embedding / LM head frozen).  A registered family starts from its kind's.
FINETUNE_DEFAULTS: dict[str, tuple[int, float]] = {"decoder": (200, 1e-3), "encoder": (400, 5e-4),
                                                   "encoder-decoder": (400, 1e-2)}


@dataclass
class PipelineConfig(PretrainConfig):
    samples: SampleConfig = field(default_factory=SampleConfig)
    finetune: PipelineFinetuneConfig = field(default_factory=PipelineFinetuneConfig)
    sft: stage_sft.PipelineSFTConfig = field(default_factory=stage_sft.PipelineSFTConfig)
    incontext: PipelineInContextConfig = field(default_factory=PipelineInContextConfig)


def stage_data(ctx: Context) -> None:
    require_single_process("pipeline")
    parts = pretrain_recipe.build(ctx.cfg, say=say)
    ctx.parts = parts
    mc = parts.model.config
    layers = getattr(mc, "n_layer", None) or getattr(mc, "num_layers", "?")
    ctx.results["model"] = (f"{mc.family}, {layers} layers, d={mc.d_model}, "
                            f"{sum(p.numel() for p in parts.model.parameters()):,} parameters")
    say(f"model: {ctx.results['model']}")


def stage_pretrain(ctx: Context) -> None:
    parts = ctx.parts
    result = pretrain_recipe.train_and_save(parts).final  # RUN_DIR/model: the final weights
    ctx.results["pretrain"] = result
    _plot_pretraining(ctx)
    shards, cfg = parts.shards, ctx.cfg
    # elapsed_s counts every attempt of a resumed run, as tokens does: the run's throughput, pauses for evaluation
    # and checkpoints included (tokens_per_s in metrics.jsonl is the last log interval's alone)
    throughput = result["tokens"] / result["elapsed_s"] if result.get("elapsed_s") else None
    ctx.results["throughput"] = throughput
    last = {k: result.get(k) for k in ("step", "loss", "val_loss", "val_ppl", "val_mlm_acc", "val_nsp_acc",
                                        "val_target_acc", "tokens") if k in result}
    last["tokens/s (whole run)"] = f"{throughput:,.0f}" if throughput else "-"
    body = [
        f"Model: {ctx.results['model']}; tokenizer: {parts.tokenizer.vocab_size} tokens; data: "
        f"{shards.num_tokens('train'):,} train / {shards.num_tokens('val'):,} validation tokens of {cfg.data.source}.",
        "",
        "![loss and validation perplexity](curves.png)" if _has_plot(ctx) else
        "_(install matplotlib — `pip install -e \".[plots]\"` — for the loss curves)_",
        "",
        markdown_table([last]),
        "",
        f"At the last step: `loss` is the training loss of that step's batch ({cfg.train.global_batch_size} windows "
        f"of {cfg.data.seq_len} tokens); `val_*` are the Trainer's evaluation on the first "
        f"{cfg.train.eval_max_batches or 'all'} validation batches; `tokens` counts every training token; "
        f"tokens/s is that count over the run's whole training time (evaluation and checkpoint pauses included). "
        f"Every logged point is in the curves (their data: `curves.json`).",
    ]
    ctx.report.add("Pretraining", "\n".join(body))


def _has_plot(ctx: Context) -> bool:
    return (ctx.run_dir / "curves.json").is_file()


def _plot_pretraining(ctx: Context, references: dict[str, float] | None = None) -> bool:
    """curves.png from metrics.jsonl; the eval stage draws it again with the unigram perplexity as a reference."""
    metrics = read_metrics(ctx.run_dir / "metrics.jsonl")
    return plot_curves(metrics, ctx.run_dir / "curves.png", title="pretraining", references=references)


def majority_baseline(batches) -> float:
    """Accuracy of always predicting the most frequent target (labels != -100) of ``batches``."""
    labels = torch.cat([b["labels"][b["labels"] != -100] for b in batches])
    return float(torch.bincount(labels).max()) / max(labels.numel(), 1)


def stage_eval(ctx: Context) -> None:
    """By the pretraining objective: its own validation metrics beside a baseline; a causal LM's perplexity."""
    objective = family_of(ctx.parts.model).pretrain_objective
    return {"mlm_nsp": eval_encoder, "span": eval_encdec}.get(objective, eval_decoder)(ctx)


def _val_source(ctx: Context):
    """The validation batches the Trainer's evaluator saw (same fixed masks / corruptions)."""
    cfg, parts = ctx.cfg, ctx.parts
    return paradigm_parts(cfg, parts.shards, parts.tokenizer, split="val")[1]


def eval_encoder(ctx: Context) -> None:
    r = ctx.results["pretrain"]
    bs = ctx.cfg.train.micro_batch_size or ctx.cfg.train.global_batch_size
    batches = list(_val_source(ctx).val_batches(bs, ctx.cfg.train.eval_max_batches or None))
    base = majority_baseline(batches)
    out = {"val_mlm_acc": r.get("val_mlm_acc"), "majority_mlm_acc": base, "val_mlm_loss": r.get("val_mlm_loss")}
    rows = [{"metric": "masked-token accuracy", "model": r.get("val_mlm_acc"), "baseline": base,
             "baseline is": "most frequent masked token"}]
    if "val_nsp_acc" in r:
        out["val_nsp_acc"] = r["val_nsp_acc"]
        rows.append({"metric": "next-sentence accuracy", "model": r["val_nsp_acc"], "baseline": 0.5,
                     "baseline is": "chance (50/50 pairs)"})
    ctx.results["eval"] = out
    ctx.report.add("Evaluation", markdown_table(rows) + "\n\nOn the validation split, with the fixed masks the "
                   "Trainer's evaluator used.")


def eval_encdec(ctx: Context) -> None:
    r = ctx.results["pretrain"]
    bs = ctx.cfg.train.micro_batch_size or ctx.cfg.train.global_batch_size
    batches = list(_val_source(ctx).val_batches(bs, ctx.cfg.train.eval_max_batches or None))
    base = majority_baseline(batches)
    ctx.results["eval"] = {"val_target_acc": r.get("val_target_acc"), "majority_target_acc": base,
                           "val_loss": r.get("val_loss")}
    rows = [{"metric": "target-token accuracy (the pretraining targets: spans, and whole windows if "
                       "span.full_text_fraction > 0)", "model": r.get("val_target_acc"), "baseline": base,
             "baseline is": "most frequent target token"},
            {"metric": "target-token loss (nats)", "model": r.get("val_loss"), "baseline": "", "baseline is": ""}]
    ctx.report.add("Evaluation", markdown_table(rows) + "\n\nOn the validation split (fixed corruption), "
                   "teacher-forced.")


VALIDATION_FILE = "validation.jsonl"
"""The validation split's documents as text (RUN_DIR/validation.jsonl): what `lmforge eval perplexity` needs to
reproduce the report's perplexity."""

EVAL_BATCH = 16


def write_validation_docs(ctx: Context) -> list[str]:
    """The source's documents the shards put in the validation split, in order, written as JSONL (field text)."""
    cfg, shards = ctx.cfg, ctx.parts.shards
    wanted = set(shards.doc_ids("val").tolist())
    docs = [d for i, d in enumerate(iter_documents(cfg.data.source, cfg.data.field, world_bytes=cfg.data.world_bytes))
            if i in wanted]
    atomic_write_text(ctx.run_dir / VALIDATION_FILE,
                      "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    return docs


def perplexity_command(ctx: Context, seq: int, stride: int) -> str:
    return shlex.join(["lmforge", "eval", "perplexity", "--model", str(ctx.run_dir / "model"), "--data",
                       str(ctx.run_dir / VALIDATION_FILE), "--max-length", str(seq), "--stride", str(stride),
                       "--batch-size", str(EVAL_BATCH)])


def eval_decoder(ctx: Context) -> None:
    """The exported model's perplexity on the validation documents, by the library call `lmforge eval perplexity`
    makes (the report gives that command), beside a unigram model of the training tokens."""
    parts = ctx.parts
    model = parts.model.eval()
    shards = parts.shards
    seq = ctx.cfg.data.seq_len
    stride = seq // 2
    docs = write_validation_docs(ctx)
    with torch.inference_mode():
        ppl = perplexity(model, parts.tokenizer, docs, max_length=seq, stride=stride, batch_size=EVAL_BATCH)
    uni = unigram_perplexity(shards.tokens("train"), shards.tokens("val"), parts.tokenizer.vocab_size)
    ratio = ppl["perplexity"] / uni["perplexity"]
    ctx.results["eval"] = {"val_perplexity": ppl["perplexity"], "unigram_perplexity": uni["perplexity"],
                           "ratio_to_unigram": ratio, "val_bits_per_byte": ppl["bits_per_byte"],
                           "val_tokens": ppl["tokens"], "window": seq, "stride": stride}
    _plot_pretraining(ctx, references={"unigram baseline": uni["perplexity"]})
    how = (f"on the validation split of {ctx.cfg.data.source} ({len(docs)} documents, `{VALIDATION_FILE}`), "
           f"{seq}-token windows advancing by {stride}, {ppl['tokens']:,} scored tokens")
    rows = [
        {"model": "unigram baseline (token frequencies of the training split, add-one smoothed)",
         "validation perplexity": uni["perplexity"]},
        {"model": "lmforge decoder (the exported model/)", "validation perplexity": ppl["perplexity"],
         "bits per byte": ppl["bits_per_byte"]},
    ]
    line = f"perplexity {ppl['perplexity']:.4f}  bits/byte {ppl['bits_per_byte']:.4f}  tokens {ppl['tokens']}"
    ctx.reproduce.append((line, perplexity_command(ctx, seq, stride)))
    say(f"validation perplexity {ppl['perplexity']:.4f} {how}; unigram baseline {uni['perplexity']:.1f}")
    ctx.report.add("Evaluation", markdown_table(rows, ["model", "validation perplexity", "bits per byte"]) + "\n\n" +
                   f"Perplexity {how}.  The model's perplexity is **{100 * ratio:.1f}%** of the unigram model's "
                   f"(lower is better; a model that learned nothing beyond word frequencies would be near 100%).  "
                   f"The unigram line in the curves' right panel is the same baseline.")


def stage_samples(ctx: Context) -> None:
    s = ctx.cfg.samples
    model, tok = ctx.parts.model.eval(), ctx.parts.tokenizer
    family = family_of(model)
    prompts = s.prompts or OBJECTIVE_PROMPTS.get(family.pretrain_objective, DEFAULT_PROMPTS)
    lines = []
    if family.pretrain_objective == "mlm_nsp":  # a masked LM does not generate: it fills in [MASK]s
        with torch.inference_mode():
            preds = [fill_mask(model, tok, p, top_k=3) for p in prompts]
        ctx.results["samples"] = [{"prompt": p, "predictions": pr} for p, pr in zip(prompts, preds)]
        for p, pr in zip(prompts, preds):
            options = "; ".join(", ".join(f"{t!r} {q:.2f}" for t, q in m) for m in pr)
            lines += [f"- `{p}` → {options}"]
        ctx.report.add("Samples (fill-mask, top 3)", "\n".join(lines))
        return
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=ctx.cfg.seed)
    with torch.inference_mode():
        if family.kind == "encoder-decoder":
            gen.max_new_tokens = min(gen.max_new_tokens, 24)
            results = generate_seq2seq_text(model, tok, prompts, gen)
            texts = [f"{p}\n→ {tok.decode(r.tokens)}" for p, r in zip(prompts, results)]
        else:
            results = generate_text(model, tok, prompts, gen)
            texts = [(p + r.text).strip() for p, r in zip(prompts, results)]
    ctx.results["samples"] = [{"prompt": p, "completion": r.text} for p, r in zip(prompts, results)]
    for t in texts:
        lines += ["```text", t, "```", ""]
    lines += [f"Greedy decoding, at most {gen.max_new_tokens} new tokens per prompt.  What to expect: a model of this "
              f"size ({ctx.results.get('model', family.name)}) learns how the world's sentences are written well "
              "before it learns their facts, so its samples read fluently but are often wrong — sums such as "
              "12 + 7, which town is nearest, who leads a town.  How often they are right is not measured here."]
    ctx.report.add("Samples (greedy)", "\n".join(lines))


def stage_finetune(ctx: Context) -> None:
    f = ctx.cfg.finetune
    if not f.enabled:
        return
    family = get_family(ctx.cfg.model.family)
    seq2seq = family.kind == "encoder-decoder"
    task = finetune_task(ctx.cfg)
    steps, lr = FINETUNE_DEFAULTS[family.kind]
    steps, lr = f.max_steps or steps, f.lr or lr
    every = max(1, steps // 4)
    train = dataclasses.replace(finetune_train_defaults(), lr=lr, global_batch_size=f.global_batch_size,
                                warmup_steps=min(40, steps // 10), eval_every=every, ckpt_every=every,
                                device=ctx.cfg.train.device, tensorboard=ctx.cfg.train.tensorboard)
    if seq2seq:  # AdamW at T5's scale overwrites the small attention weights; frozen head: held-out names
        train = dataclasses.replace(train, optimizer="adafactor", freeze=["shared"])
    # counterfactual answers: the model must read the passage, not recall the train entities' answers
    task_cfg = TaskConfig(name=task, n_train=f.n_train, world_seed=world_seed(ctx.cfg.data.source),
                          counterfactual=1.0 if task == "world-qa-context" else 0.0)
    cfg = FinetuneConfig(run_dir=str(ctx.run_dir / "finetune"), seed=ctx.cfg.seed, max_steps=steps,
                         resume="auto", overwrite=ctx.cfg.overwrite, model=str(ctx.run_dir / "model"), task=task_cfg,
                         train=train)
    # a fresh pooler (BERT's, which the pooled classifier reads): the NSP-trained one stalls fine-tuning for hundreds
    # of steps (measured)
    if family.classifier == "pooled":
        cfg.head.reinit_pooler = True
    result = finetune(cfg)
    write_finetune_report(result)  # finetune/report.md: its curves plot the task metric beside its baselines
    ctx.results["finetune"] = {"task": task, "test": result.get("test"), "baselines": result.get("baselines")}
    ctx.report.add("Fine-tuning", finetune_section(result) + "\n\nRun dir: `finetune/`; its report, with the "
                   "curves of the task metric: [finetune/report.md](finetune/report.md).")


def finetune_task(cfg: PipelineConfig) -> str:
    task = cfg.finetune.task
    if task == "auto":
        task = "world-qa-context" if get_family(cfg.model.family).kind == "encoder-decoder" else "world-sentiment"
    return task


# ---- what the terminal shows: a banner per stage with its ETA and the run's -------------------------------------
def _pretrain_rate(ctx: Context) -> Optional[tuple[float, float]]:
    """(seconds per step, tokens per second) pretraining measured; None before it ran."""
    r = ctx.results.get("pretrain")
    if not r or not r.get("elapsed_s") or not r.get("step"):
        return None
    return r["elapsed_s"] / r["step"], r["tokens"] / r["elapsed_s"]


def _estimate_eval(ctx: Context) -> Optional[float]:
    # forward passes only (about a third of a training step's work per token); stride = half a window scores
    # every token twice over
    rate = _pretrain_rate(ctx)
    return None if rate is None else 2 * ctx.parts.shards.num_tokens("val") / (3 * rate[1])


def _estimate_samples(ctx: Context) -> Optional[float]:
    # one forward pass over at most a window per generated token
    rate = _pretrain_rate(ctx)
    s = ctx.cfg.samples
    n = len(s.prompts) or len(DEFAULT_PROMPTS)
    return None if rate is None else n * s.max_new_tokens * ctx.cfg.data.seq_len / (3 * rate[1])


def _estimate_finetune(ctx: Context) -> Optional[float]:
    # pretraining's time per step, scaled by the batch size (fine-tuning examples are shorter: an upper bound)
    rate, f = _pretrain_rate(ctx), ctx.cfg.finetune
    if rate is None or not f.enabled:
        return None if f.enabled else 0.0
    steps = f.max_steps or FINETUNE_DEFAULTS[get_family(ctx.cfg.model.family).kind][0]
    return rate[0] * steps * f.global_batch_size / ctx.cfg.train.global_batch_size


def _describe_finetune(ctx: Context) -> str:
    f = ctx.cfg.finetune
    if not f.enabled:
        return "skipped (finetune.enabled=false)"
    return (f"fine-tune the pretrained model on {finetune_task(ctx.cfg)}, {f.n_train} training examples, then score "
            f"its test split beside the task's baselines")


STAGES: list[Stage] = [
    Stage("data + tokenizer", stage_data,
          lambda c: f"the corpus ({c.cfg.data.source}), a tokenizer, train/validation token shards, the model"),
    Stage("pretrain", stage_pretrain,
          lambda c: f"train the {c.cfg.model.family} model for {c.cfg.max_steps} steps of "
                    f"{c.cfg.train.global_batch_size} × {c.cfg.data.seq_len} tokens, evaluating every "
                    f"{c.cfg.train.eval_every} steps"),
    Stage("eval", stage_eval, lambda c: "score the model on the validation split beside a baseline", _estimate_eval),
    Stage("samples", stage_samples, lambda c: "a few prompts, answered greedily", _estimate_samples),
    INCONTEXT_STAGE,
    Stage("finetune", stage_finetune, _describe_finetune, _estimate_finetune),
    stage_sft.STAGE,
]


def banner(ctx: Context, index: int, stages: list[Stage], elapsed: float) -> str:
    """``== stage 2/5: pretrain — what it does ==`` and a line with its ETA and the whole run's."""
    stage = stages[index]
    head = f"== stage {index + 1}/{len(stages)}: {stage.name} — {stage.describe(ctx)} =="
    own = stage.estimate(ctx)
    rest = [st.estimate(ctx) for st in stages[index:]]
    if own is None:
        eta = "ETA: not measured yet (" + ("the progress lines below show one" if stage.name == "pretrain" else
                                           "the training steps are not timed yet") + ")"
    else:
        eta = f"ETA ≈ {fmt_duration(own)} (from pretraining's measured speed)"
    if any(r is None for r in rest):
        run = "the run's: known once pretraining has been timed"
    else:
        run = f"the run's ≈ {fmt_duration(sum(rest))} more ({fmt_duration(elapsed)} so far)"
    return f"{head}\n   {eta}; {run}"


def closing_lines(ctx: Context, report_path: Path, total: float) -> list[str]:
    """What the run left and where: the report, the model dirs, the numbers with how they were measured."""
    lines = [f"pipeline done in {fmt_duration(total)}: report {report_path}",
             f"  pretrained model: {ctx.run_dir / 'model'}"]
    if (ctx.run_dir / "finetune" / "model").is_dir():
        lines.append(f"  fine-tuned model: {ctx.run_dir / 'finetune' / 'model'}")
    if (ctx.run_dir / "sft" / "model").is_dir():
        lines.append(f"  SFT model: {ctx.run_dir / 'sft' / 'model'}")
    ev = ctx.results.get("eval", {})
    if "val_perplexity" in ev:
        lines.append(f"  validation perplexity {ev['val_perplexity']:.4f} ({ev['window']}-token windows, stride "
                     f"{ev['stride']}; unigram baseline {ev['unigram_perplexity']:.1f})")
    ft = ctx.results.get("finetune")
    if ft and ft.get("test"):
        scores = ", ".join(f"{k} {v:.3f}" for k, v in ft["test"].items() if isinstance(v, float))
        lines.append(f"  fine-tuned {ft['task']}: test {scores}")
    lines += [f"  reproduce: {cmd}" for _, cmd in ctx.reproduce]
    return lines


def reproduce_section(ctx: Context) -> str:
    if not ctx.reproduce:
        return ("The numbers above are the Trainer's evaluation during the run; no separate command scores them "
                "yet for this model family.")
    body = ["Each evaluation number above, printed again by one command (from the directory the pipeline ran in):",
            ""]
    for printed, cmd in ctx.reproduce:
        body += ["```sh", cmd, "```", f"prints `{printed}`.", ""]
    return "\n".join(body)


def load_pipeline_config(config_path: str | None, overrides: list[str]) -> PipelineConfig:
    # `lmforge pipeline max_steps=10` — the first positional is an override, not a file.
    config_path, overrides = split_config_arg(config_path, overrides)
    # The built-in defaults stand in for a config file; a given file is complete on its own (it may be another
    # model family, whose keys the decoder defaults would not fit).
    return load_config(PipelineConfig, config_path, overrides, base=None if config_path else _pipeline_defaults())


def run_pipeline(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    cfg = load_pipeline_config(config_path, overrides)
    with training_run(cfg.run_dir):  # one live pipeline per run dir, for all its stages
        return _run_stages(cfg)


def _run_stages(cfg: PipelineConfig) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    report = Report(title=f"lmforge pipeline: a {cfg.model.family} model on {cfg.data.source}, pretrained and "
                          f"fine-tuned")
    ctx = Context(cfg=cfg, report=report, run_dir=run_dir)
    start = time.perf_counter()
    for i, stage in enumerate(STAGES):
        say(banner(ctx, i, STAGES, time.perf_counter() - start))
        t = time.perf_counter()
        stage.run(ctx)
        ctx.timings[stage.name] = time.perf_counter() - t
    total = time.perf_counter() - start
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    throughput = ctx.results.get("throughput")
    speed = f"  Pretraining throughput: {throughput:,.0f} tokens/s over the whole training time." if throughput else ""
    report.sections.insert(0, ("Summary", markdown_table(
        [{"stage": k, "wall time (s)": round(v, 1)} for k, v in ctx.timings.items()] +
        [{"stage": "total", "wall time (s)": round(total, 1)}]) + f"\n\nMachine: {machine}.{speed}"))
    report.add("Reproducing the numbers", reproduce_section(ctx))
    report.add("Resolved config", "```yaml\n" + dump_yaml(cfg) + "```")
    report_path = report.write(run_dir / "report.md")
    summary = {"run_dir": str(run_dir), "family": cfg.model.family, "wall_s": total, **ctx.results.get("eval", {}),
               "final_loss": ctx.results.get("pretrain", {}).get("loss"), "finetune": ctx.results.get("finetune"),
               "sft": ctx.results.get("sft"), "report": str(report_path)}
    atomic_write_json(run_dir / "pipeline_summary.json", {**summary, "timings": ctx.timings,
                                                          "samples": ctx.results.get("samples")})
    say("\n".join(closing_lines(ctx, report_path, total)))
    return summary
