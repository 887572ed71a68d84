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
    max_steps: int = 250
    lr: float = 3e-3
    """Full fine-tuning at pretraining's peak rate: of the settings measured on the pipeline's model (RESULTS.md,
    issue 27 calibration) the best; lower rates and fewer conversations learnt less."""
    global_batch_size: int = 32
    """Conversations per step (packed into rows of the model's context)."""
    n_train: int = 8000
    """Conversations, spread evenly over the seen task types: about one pass at these settings (repeating a smaller
    set overfits: validation loss rose while training loss fell)."""
    eval_n: int = 20
    """Records per task type and split in the exact-match tables."""
    shots: int = 3


def sft_config(ctx: Context) -> SFTConfig:
    s = ctx.cfg.sft
    train = dataclasses.replace(sft_train_defaults(), lr=s.lr, global_batch_size=s.global_batch_size,
                                warmup_steps=min(30, s.max_steps // 10), eval_every=max(1, s.max_steps // 3),
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
    say("eval instructions: the SFT model zero-shot, the pretrained model zero- and few-shot and by likelihood")
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
        f"{cfg.max_steps} steps of {cfg.train.global_batch_size} conversations, peak lr {cfg.train.lr}.  The assistant of "
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


TOKENS_PER_CONVERSATION = 56
"""Input tokens of a world instruction conversation in ChatML with the pipeline's tokenizer (measured: 537,446
tokens in 300 steps of 32)."""


def _estimate(ctx: Context) -> Optional[float]:
    # pretraining's seconds per token times the SFT tokens, plus the exact-match evaluation (measured: about a
    # quarter of the training time at the default settings)
    r, s = ctx.results.get("pretrain"), ctx.cfg.sft
    if not runs(ctx):
        return 0.0
    if not r or not r.get("elapsed_s") or not r.get("tokens"):
        return None
    return r["elapsed_s"] / r["tokens"] * s.max_steps * s.global_batch_size * TOKENS_PER_CONVERSATION * 1.25


def _describe(ctx: Context) -> str:
    s = ctx.cfg.sft
    if not runs(ctx):
        return ("skipped (sft.enabled=false)" if not s.enabled else
                f"skipped ({ctx.cfg.model.family} is no decoder: SFT generates replies)")
    return (f"instruction-tune the pretrained model on {s.n_train} world instructions for {s.max_steps} steps, then "
            f"exact match per task type beside the pretrained model zero- and few-shot and by likelihood")


STAGE = Stage("sft", stage_sft, _describe, _estimate)
