"""`lmforge pipeline`: the life cycle so far, on the built-in world, in one run dir with one report.

Stages run in order and each contributes a section to ``RUN_DIR/report.md`` and its wall time:

1. data + tokenizer — the world corpus, a byte-level BPE trained on it, token shards;
2. pretrain — the decoder trained by the one Trainer (curves from metrics.jsonl);
3. eval — validation perplexity and bits-per-byte beside the unigram baseline of the same text;
4. samples — greedy continuations of a few prompts.

Later issues append stages (fine-tuning, delta tuning, SFT, alignment) to :data:`STAGES`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.apps.report import Report, markdown_table, plot_curves, read_metrics
from lmforge.core.config import dump_yaml, load_config
from lmforge.core.io import atomic_write_json
from lmforge.recipes import pretrain as pretrain_recipe
from lmforge.recipes.pretrain import PretrainConfig

DEFAULT_PROMPTS = [
    "There once was a fisher named",
    "Q: Who is the mayor of",
    "12 + 7 =",
]


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
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
class PipelineConfig(PretrainConfig):
    samples: SampleConfig = field(default_factory=SampleConfig)


@dataclass
class Context:
    cfg: PipelineConfig
    report: Report
    run_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    parts: Any = None


def stage_pretrain(ctx: Context) -> None:
    parts = pretrain_recipe.build(ctx.cfg)
    ctx.timings["data + tokenizer"] = parts.timings["tokenizer_s"] + parts.timings["shards_s"]
    ctx.parts = parts
    t = time.perf_counter()
    result = parts.trainer.fit()
    ctx.timings["pretrain"] = time.perf_counter() - t
    from lmforge.models.hf import save_model

    save_model(parts.model.cpu(), ctx.run_dir / "model", tokenizer=parts.tokenizer)
    ctx.results["pretrain"] = result
    metrics = read_metrics(ctx.run_dir / "metrics.jsonl")
    has_plot = plot_curves(metrics, ctx.run_dir / "curves.png", title="pretraining")
    shards = parts.shards
    body = [
        f"Model: {parts.model.config.family}, {parts.model.config.n_layer} layers, d={parts.model.config.d_model}, "
        f"{sum(p.numel() for p in parts.model.parameters()):,} parameters; tokenizer: {parts.tokenizer.vocab_size} "
        f"tokens; data: {shards.num_tokens('train'):,} train / {shards.num_tokens('val'):,} validation tokens.",
        "",
        "![loss and validation perplexity](curves.png)" if has_plot else
        "_(install matplotlib — `pip install -e \".[plots]\"` — for the loss curves)_",
        "",
        markdown_table([{k: result.get(k) for k in ("step", "loss", "val_loss", "val_ppl", "tokens", "tokens_per_s")
                         if k in result}]),
    ]
    ctx.report.add("Pretraining", "\n".join(body))


def stage_eval(ctx: Context) -> None:
    from lmforge.eval.perplexity import perplexity_of_tokens, unigram_perplexity

    parts = ctx.parts
    model = parts.model.eval()
    shards = parts.shards
    val_tokens = shards.tokens("val")
    seq = ctx.cfg.data.seq_len
    with torch.inference_mode():
        ppl = perplexity_of_tokens(model, val_tokens, max_length=seq, stride=seq // 2, batch_size=16)
    uni = unigram_perplexity(shards.tokens("train"), val_tokens, parts.tokenizer.vocab_size)
    bpb = ppl["nll"] / (0.6931471805599453 * shards.num_bytes("val")) * (len(val_tokens) / ppl["tokens"])
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
    from lmforge.eval.generate import GenerationConfig, generate_text

    s = ctx.cfg.samples
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=ctx.cfg.seed)
    with torch.inference_mode():
        results = generate_text(ctx.parts.model.eval(), ctx.parts.tokenizer, s.prompts, gen)
    ctx.results["samples"] = [{"prompt": p, "completion": r.text} for p, r in zip(s.prompts, results)]
    lines = []
    for p, r in zip(s.prompts, results):
        lines += ["```text", (p + r.text).strip(), "```", ""]
    ctx.report.add("Samples (greedy)", "\n".join(lines))


STAGES: list[tuple[str, Callable[[Context], None]]] = [
    ("pretrain", stage_pretrain),
    ("eval", stage_eval),
    ("samples", stage_samples),
]


def load_pipeline_config(config_path: str | None, overrides: list[str]) -> PipelineConfig:
    # `lmforge pipeline max_steps=10` — the first positional is an override, not a file.
    if config_path is not None and "=" in config_path and not os.path.exists(config_path):
        overrides = [config_path, *overrides]
        config_path = None
    return load_config(PipelineConfig, config_path, overrides, base=_pipeline_defaults())


def run_pipeline(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    cfg = load_pipeline_config(config_path, overrides)
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
    summary = {"run_dir": str(run_dir), "wall_s": total, **ctx.results.get("eval", {}),
               "final_loss": ctx.results.get("pretrain", {}).get("loss")}
    atomic_write_json(run_dir / "pipeline_summary.json", {**summary, "timings": ctx.timings,
                                                          "samples": ctx.results.get("samples")})
    return summary
