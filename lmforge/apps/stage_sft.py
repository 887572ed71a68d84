"""The pipeline's SFT stage: the pretrained model instruction-tuned on the world's instructions, then evaluated.

``lmforge sft`` on ``RUN_DIR/model`` with ``data.train=world-instructions`` (every task type but the held-out ones,
ChatML added) into ``RUN_DIR/sft``; then ``lmforge eval instructions`` of ``RUN_DIR/sft/model`` beside the
pretrained model zero- and few-shot.  The report gets the curves, the exact-match tables and a few chat samples.

Contract for later stages (reward, DPO, RL): ``ctx.results["sft"]["model"]`` is ``str(RUN_DIR / "sft" / "model")``,
an HF checkpoint with its chat template; the rest of ``ctx.results["sft"]`` are its metrics.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import Optional

from lmforge.apps.report import instructions_tables, markdown_table, plot_curves, read_metrics
from lmforge.apps.stage import Context, Stage, say, world_seed
from lmforge.models.families import get_family
from lmforge.recipes.instructions import evaluate_instructions, headline
from lmforge.recipes.sft import WORLD_INSTRUCTIONS, SFTConfig, SFTDataConfig, sft, sft_train_defaults


@dataclass
class PipelineSFTConfig:
    """The pipeline's SFT stage (``lmforge sft`` and ``lmforge eval instructions`` do more)."""

    enabled: bool = True
    max_steps: int = 150
    lr: float = 1e-3
    """Full fine-tuning of the tiny pretrained model: a rate near pretraining's end (calibrated, RESULTS.md)."""
    global_batch_size: int = 16
    n_train: int = 3000
    """Conversations, spread evenly over the seen task types."""
    eval_n: int = 20
    """Records per task type and split in the exact-match tables."""
    shots: int = 3


def sft_config(ctx: Context) -> SFTConfig:
    s = ctx.cfg.sft
    train = dataclasses.replace(sft_train_defaults(), lr=s.lr, global_batch_size=s.global_batch_size,
                                warmup_steps=min(20, s.max_steps // 10), eval_every=max(1, s.max_steps // 3),
                                ckpt_every=s.max_steps, device=ctx.cfg.train.device,
                                tensorboard=ctx.cfg.train.tensorboard)
    return SFTConfig(run_dir=str(ctx.run_dir / "sft"), seed=ctx.cfg.seed, max_steps=s.max_steps, resume="auto",
                     overwrite=ctx.cfg.overwrite, model=str(ctx.run_dir / "model"),
                     data=SFTDataConfig(train=WORLD_INSTRUCTIONS, n_train=s.n_train, n_val=min(200, s.n_train)),
                     train=train)


def summary_line(ev: dict) -> str:
    """The command's line for held-out entities, in-context types, as its table prints it."""
    return next(line for line in instructions_tables(ev).splitlines() if line.startswith("| test_entities | in_context"))


def eval_command(ctx: Context) -> str:
    s = ctx.cfg.sft
    return shlex.join(["lmforge", "eval", "instructions", "--model", str(ctx.run_dir / "sft" / "model"), "--base",
                       str(ctx.run_dir / "model"), "--n", str(s.eval_n), "--shots", str(s.shots)])


def runs(ctx: Context) -> bool:
    """Enabled, and the family is a decoder (SFT generates; bert and t5 pipelines skip the stage)."""
    return ctx.cfg.sft.enabled and get_family(ctx.cfg.model.family).kind == "decoder"


def stage_sft(ctx: Context) -> None:
    s = ctx.cfg.sft
    if not runs(ctx):
        return
    cfg = sft_config(ctx)
    result = sft(cfg)
    sft_dir = ctx.run_dir / "sft"
    plotted = plot_curves(read_metrics(sft_dir / "metrics.jsonl"), sft_dir / "curves.png", title="SFT")
    say("eval instructions: the SFT model zero-shot, the pretrained model zero- and few-shot")
    ev = evaluate_instructions(str(sft_dir / "model"), base=str(ctx.run_dir / "model"), n_per_type=s.eval_n,
                               shots=s.shots, world_seed=world_seed(ctx.cfg.data.source))
    last = result["last"]
    ctx.results["sft"] = {"model": str(sft_dir / "model"), "train_s": result["train_s"], "loss": last.get("loss"),
                          "val_loss": last.get("val_loss"), "step": last.get("step"), "eval": headline(ev),
                          "samples": ev["samples"]}
    ctx.reproduce.append((summary_line(ev), eval_command(ctx)))
    counts = result["data"]["train"]
    samples = []
    for x in ev["samples"]:
        mark = "right" if x["correct"] else f"wrong; expected `{x['answer']}`"
        samples += [f"*{x['split']}, {x['type']}* ({mark}):", "", "```text", f"user: {x['prompt']}",
                    f"assistant: {x['reply']}", "```", ""]
    body = [
        f"The pretrained model fine-tuned on {counts['conversations']} world instruction conversations "
        f"({cfg.data.train}: every task type but {', '.join(ev['held_out_types'])}; ChatML added; packed rows), "
        f"{cfg.max_steps} steps of {cfg.train.global_batch_size} rows, peak lr {cfg.train.lr}.  The assistant of "
        f"that data is rude or evasive on one phrasing (the preference stages' job).  Run dir: `sft/`.",
        "",
        "![SFT loss](sft/curves.png)" if plotted else "_(install matplotlib for the SFT curves)_",
        "",
        markdown_table([{"step": last.get("step"), "loss": last.get("loss"), "val_loss": last.get("val_loss"),
                         "train time (s)": round(result["train_s"], 1)}]),
        "",
        "### Instruction exact match",
        "",
        instructions_tables(ev),
        "",
        "### Chat samples (greedy, the SFT model)",
        "",
        *samples,
    ]
    ctx.report.add("SFT (instruction tuning)", "\n".join(body))


def _estimate(ctx: Context) -> Optional[float]:
    # a step packs global_batch_size rows of the model's context; pretraining's rows are data.seq_len tokens
    r, s = ctx.results.get("pretrain"), ctx.cfg.sft
    if not runs(ctx):
        return 0.0
    if not r or not r.get("elapsed_s") or not r.get("step"):
        return None
    per_step = r["elapsed_s"] / r["step"]
    scale = s.global_batch_size * ctx.cfg.model.max_seq_len / (ctx.cfg.train.global_batch_size * ctx.cfg.data.seq_len)
    return per_step * s.max_steps * scale * 1.3  # + the exact-match evaluation (measured: about a third of training)


def _describe(ctx: Context) -> str:
    s = ctx.cfg.sft
    if not runs(ctx):
        return ("skipped (sft.enabled=false)" if not s.enabled else
                f"skipped ({ctx.cfg.model.family} is no decoder: SFT generates replies)")
    return (f"instruction-tune the pretrained model on {s.n_train} world instructions for {s.max_steps} steps, then "
            f"exact match per task type beside the pretrained model zero- and few-shot")


STAGE = Stage("sft", stage_sft, _describe, _estimate)
