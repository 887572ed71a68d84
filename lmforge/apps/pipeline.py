"""`lmforge pipeline`: the life cycle so far, on the built-in world, in one run dir with one report.

Stages run in order and each contributes a section to ``RUN_DIR/report.md`` and its wall time:

1. data + tokenizer — the world corpus, a byte-level BPE trained on it, token shards;
2. pretrain — the decoder trained by the one Trainer (curves from metrics.jsonl);
3. eval — validation perplexity and bits-per-byte beside the unigram baseline of the same text;
4. samples — greedy continuations of a few prompts;
5. finetune — the pretrained model fine-tuned on a world task (sentiment; T5: reading-comprehension QA)
   beside the task's majority and bag-of-words baselines.

Any model family pretrains (``model.family``: gpt2, llama, bert, t5, or a registered one); the eval and samples
stages follow the family's pretraining objective: perplexity vs a unigram model for causal LMs (gpt2, llama),
masked-token / next-sentence accuracy for masked LMs (bert) and target-token accuracy for span corruption (t5)
beside majority-class baselines, and greedy continuations, fill-mask predictions or span infilling as samples.
The fine-tuning stage's settings follow the family's kind (decoder, encoder, encoder-decoder).

Later issues append stages (delta tuning, SFT, alignment) to :data:`STAGES`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lmforge.apps.report import Report, finetune_section, markdown_table, plot_curves, read_metrics
from lmforge.core.config import dump_yaml, load_config, split_config_arg
from lmforge.core.io import atomic_write_json
from lmforge.data.tasks import TaskConfig
from lmforge.eval.fill_mask import fill_mask
from lmforge.eval.generate import GenerationConfig, generate_text
from lmforge.eval.generate_seq2seq import generate_seq2seq_text
from lmforge.eval.perplexity import bits_per_byte, perplexity_of_tokens, unigram_perplexity
from lmforge.models.families import family_of, get_family
from lmforge.recipes import pretrain as pretrain_recipe
from lmforge.recipes.finetune import FinetuneConfig, finetune, finetune_train_defaults
from lmforge.recipes.pretrain import PretrainConfig, paradigm_parts
from lmforge.train.distributed import require_single_process
from lmforge.train.runlock import training_run

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


@dataclass
class Context:
    cfg: PipelineConfig
    report: Report
    run_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    parts: Any = None


def stage_pretrain(ctx: Context) -> None:
    require_single_process("pipeline")
    parts = pretrain_recipe.build(ctx.cfg)
    ctx.timings["data + tokenizer"] = parts.timings["tokenizer_s"] + parts.timings["shards_s"]
    ctx.parts = parts
    result = pretrain_recipe.train_and_save(parts).final  # RUN_DIR/model: the final weights
    ctx.timings["pretrain"] = parts.timings["train_s"]
    ctx.results["pretrain"] = result
    metrics = read_metrics(ctx.run_dir / "metrics.jsonl")
    has_plot = plot_curves(metrics, ctx.run_dir / "curves.png", title="pretraining")
    shards = parts.shards
    mc = parts.model.config
    layers = getattr(mc, "n_layer", None) or getattr(mc, "num_layers", "?")
    body = [
        f"Model: {mc.family}, {layers} layers, d={mc.d_model}, "
        f"{sum(p.numel() for p in parts.model.parameters()):,} parameters; tokenizer: {parts.tokenizer.vocab_size} "
        f"tokens; data: {shards.num_tokens('train'):,} train / {shards.num_tokens('val'):,} validation tokens.",
        "",
        "![loss and validation perplexity](curves.png)" if has_plot else
        "_(install matplotlib — `pip install -e \".[plots]\"` — for the loss curves)_",
        "",
        markdown_table([{k: result.get(k) for k in ("step", "loss", "val_loss", "val_ppl", "val_mlm_acc", "val_nsp_acc",
                                                      "val_target_acc", "tokens", "tokens_per_s") if k in result}]),
    ]
    ctx.report.add("Pretraining", "\n".join(body))


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


def eval_decoder(ctx: Context) -> None:
    parts = ctx.parts
    model = parts.model.eval()
    shards = parts.shards
    val_tokens = shards.tokens("val")
    seq = ctx.cfg.data.seq_len
    with torch.inference_mode():
        ppl = perplexity_of_tokens(model, val_tokens, max_length=seq, stride=seq // 2, batch_size=16)
    uni = unigram_perplexity(shards.tokens("train"), val_tokens, parts.tokenizer.vocab_size)
    # the shards count the split's bytes, not each token's: the scored text is taken as the scored share of them
    bpb = bits_per_byte(ppl["nll"], shards.num_bytes("val")) * (len(val_tokens) / ppl["tokens"])
    ratio = ppl["perplexity"] / uni["perplexity"]
    ctx.results["eval"] = {"val_perplexity": ppl["perplexity"], "unigram_perplexity": uni["perplexity"],
                           "ratio_to_unigram": ratio, "val_bits_per_byte": bpb, "val_tokens": ppl["tokens"]}
    rows = [
        {"model": "unigram baseline (add-one, fitted on train)", "validation perplexity": uni["perplexity"]},
        {"model": "lmforge decoder", "validation perplexity": ppl["perplexity"]},
    ]
    ctx.report.add("Evaluation", markdown_table(rows) + "\n\n" +
                   f"Model / unigram perplexity: **{ratio:.4f}** (the acceptance bar is ≤ 0.1). Bits per byte ≈ {bpb:.4f} "
                   f"(window {seq}, stride {seq // 2}, {ppl['tokens']:,} scored tokens).")


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
    ctx.report.add("Samples (greedy)", "\n".join(lines))


def stage_finetune(ctx: Context) -> None:
    f = ctx.cfg.finetune
    if not f.enabled:
        return
    family = get_family(ctx.cfg.model.family)
    seq2seq = family.kind == "encoder-decoder"
    task = f.task if f.task != "auto" else ("world-qa-context" if seq2seq else "world-sentiment")
    steps, lr = FINETUNE_DEFAULTS[family.kind]
    steps, lr = f.max_steps or steps, f.lr or lr
    every = max(1, steps // 4)
    train = dataclasses.replace(finetune_train_defaults(), lr=lr, global_batch_size=f.global_batch_size,
                                warmup_steps=min(40, steps // 10), eval_every=every, ckpt_every=every,
                                device=ctx.cfg.train.device, tensorboard=ctx.cfg.train.tensorboard)
    if seq2seq:  # AdamW at T5's scale overwrites the small attention weights; frozen head: held-out names
        train = dataclasses.replace(train, optimizer="adafactor", freeze=["shared"])
    # counterfactual answers: the model must read the passage, not recall the train entities' answers
    task_cfg = TaskConfig(name=task, n_train=f.n_train, world_seed=_world_seed(ctx.cfg.data.source),
                          counterfactual=1.0 if task == "world-qa-context" else 0.0)
    cfg = FinetuneConfig(run_dir=str(ctx.run_dir / "finetune"), seed=ctx.cfg.seed, max_steps=steps,
                         resume="auto", overwrite=ctx.cfg.overwrite, model=str(ctx.run_dir / "model"), task=task_cfg,
                         train=train)
    # a fresh pooler (BERT's, which the pooled classifier reads): the NSP-trained one stalls fine-tuning for hundreds
    # of steps (measured)
    if family.classifier == "pooled":
        cfg.head.reinit_pooler = True
    result = finetune(cfg)
    ctx.results["finetune"] = {"task": task, "test": result.get("test"), "baselines": result.get("baselines")}
    ctx.report.add("Fine-tuning", finetune_section(result) + "\n\nRun dir: `finetune/` (its own report.md and "
                   "metrics.jsonl).")


def _world_seed(source: str) -> int:
    return int(source.split(":", 1)[1]) if source.startswith("world:") else 0


STAGES: list[tuple[str, Callable[[Context], None]]] = [
    ("pretrain", stage_pretrain),
    ("eval", stage_eval),
    ("samples", stage_samples),
    ("finetune", stage_finetune),
]


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
    report = Report(title=f"lmforge pipeline — {run_dir.name}")
    ctx = Context(cfg=cfg, report=report, run_dir=run_dir)
    start = time.perf_counter()
    for name, fn in STAGES:
        t = time.perf_counter()
        fn(ctx)
        ctx.timings.setdefault(name, time.perf_counter() - t)
    total = time.perf_counter() - start
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    report.sections.insert(0, ("Summary", markdown_table(
        [{"stage": k, "wall time (s)": round(v, 1)} for k, v in ctx.timings.items()] +
        [{"stage": "total", "wall time (s)": round(total, 1)}]) + f"\n\nMachine: {machine}."))
    report.add("Resolved config", "```yaml\n" + dump_yaml(cfg) + "```")
    report.write(run_dir / "report.md")
    summary = {"run_dir": str(run_dir), "family": cfg.model.family, "wall_s": total, **ctx.results.get("eval", {}),
               "final_loss": ctx.results.get("pretrain", {}).get("loss"), "finetune": ctx.results.get("finetune")}
    atomic_write_json(run_dir / "pipeline_summary.json", {**summary, "timings": ctx.timings,
                                                          "samples": ctx.results.get("samples")})
    return summary
