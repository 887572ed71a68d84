"""The pipeline's preference stages: a reward model and DPO, both from the SFT model, on the world's pairs.

``lmforge reward`` of ``RUN_DIR/sft/model`` into ``RUN_DIR/reward`` (held-out pair accuracy per kind: correctness
only, tone only, evasive) and ``lmforge dpo`` of the same model into ``RUN_DIR/dpo`` (the implicit reward's held-out
accuracy per kind; the tone of its greedy replies beside the SFT model's: the share of rude or evasive answers should
fall, exact match should not).  Reads the SFT stage's contract, ``ctx.results["sft"]["model"]``; skipped without it.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import Optional

from lmforge.apps.report import markdown_table, plot_curves, read_metrics
from lmforge.apps.stage import Context, Stage, say, world_seed
from lmforge.recipes.dpo import DPOConfig, DPOSection, dpo, dpo_train_defaults
from lmforge.recipes.pairs import PairDataConfig
from lmforge.recipes.reward import RewardConfig, reward, reward_train_defaults
from lmforge.recipes.tone import answer_tone, tone_line


@dataclass
class PipelinePreferenceConfig:
    """The pipeline's reward and DPO stages (``lmforge reward`` / ``lmforge dpo`` do more)."""

    enabled: bool = True
    reward_steps: int = 100
    reward_lr: float = 3e-4
    dpo_steps: int = 100
    dpo_lr: float = 2e-4
    beta: float = 0.1
    sft_weight: float = 1.0
    """Weight of RPO's NLL term on the chosen answer beside the DPO loss (``dpo.loss_type=[sigmoid, sft]``); 0: plain
    DPO.  Measured on an SFT model of the world (RESULTS.md, issue 28 calibration): with it exact match rose after
    DPO (0.255 -> 0.291), without it it fell (0.145 on twice the prompts), the rude share went to 0 either way."""
    global_batch_size: int = 16
    n_train: int = 60
    """World pairs per task type for training (kinds in equal shares); held-out pairs: the recipes' defaults."""
    tone_n: int = 10
    """Held-out records per task type whose greedy replies are judged for tone."""


def _pairs(p: PipelinePreferenceConfig) -> PairDataConfig:
    return PairDataConfig(n_train=p.n_train)


def _train(ctx: Context, defaults, steps: int, lr: float):
    p = ctx.cfg.preferences
    return dataclasses.replace(defaults, lr=lr, global_batch_size=p.global_batch_size,
                               warmup_steps=min(10, steps // 10), eval_every=max(1, steps // 3), ckpt_every=steps,
                               device=ctx.cfg.train.device, tensorboard=ctx.cfg.train.tensorboard)


def _kinds_table(test: dict, what: str) -> str:
    rows = [{"kind": k, what: v["accuracy"], "pairs": v["pairs"]} for k, v in test.items()]
    return markdown_table(rows)


def _curves(run_dir, title: str) -> bool:
    return plot_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "curves.png", title=title,
                       right="val_accuracy")


def runs(ctx: Context) -> bool:
    return ctx.cfg.preferences.enabled and bool(ctx.results.get("sft", {}).get("model"))


def stage_reward(ctx: Context) -> None:
    if not runs(ctx):
        return
    p, sft_model = ctx.cfg.preferences, ctx.results["sft"]["model"]
    cfg = RewardConfig(run_dir=str(ctx.run_dir / "reward"), seed=ctx.cfg.seed, max_steps=p.reward_steps,
                       resume="auto", overwrite=ctx.cfg.overwrite, model=sft_model, data=_pairs(p),
                       train=_train(ctx, reward_train_defaults(), p.reward_steps, p.reward_lr))
    result = reward(cfg)
    test = result["test"]
    ctx.results["reward"] = {"model": str(ctx.run_dir / "reward" / "model"), "test": test,
                             "train_s": result["train_s"]}
    cmd = shlex.join(["lmforge", "eval", "reward", "--model", str(ctx.run_dir / "reward" / "model")])
    ctx.reproduce.append((f"{'all':<12} accuracy {test['all']['accuracy']:.3f}  ({test['all']['pairs']} pairs)", cmd))
    plotted = _curves(ctx.run_dir / "reward", "reward model")
    ctx.report.add("Reward model", "\n".join([
        f"A scalar head on the SFT model's last real token, trained on {result['data']['train']['pairs']} world "
        f"preference pairs (Bradley-Terry loss) for {cfg.max_steps} steps of {p.global_batch_size} pairs, lr "
        f"{p.reward_lr}.  Held-out pairs (prompts and entities never seen), accuracy of scoring the chosen answer "
        f"above the rejected one (ties half), per kind: `correctness` pairs differ only in the answer's value, "
        f"`tone` only in a rude line, `evasive` answer versus evasion.  Run dir: `reward/`.", "",
        "![reward model curves](reward/curves.png)" if plotted else "_(install matplotlib for the curves)_", "",
        _kinds_table(test, "held-out accuracy")]))


def stage_dpo(ctx: Context) -> None:
    if not runs(ctx):
        return
    p, sft_model = ctx.cfg.preferences, ctx.results["sft"]["model"]
    cfg = DPOConfig(run_dir=str(ctx.run_dir / "dpo"), seed=ctx.cfg.seed, max_steps=p.dpo_steps, resume="auto",
                    overwrite=ctx.cfg.overwrite, model=sft_model, data=_pairs(p),
                    train=_train(ctx, dpo_train_defaults(), p.dpo_steps, p.dpo_lr),
                    dpo=DPOSection(loss_type=["sigmoid", "sft"] if p.sft_weight else ["sigmoid"],
                                   loss_weights=[1.0, p.sft_weight] if p.sft_weight else None, beta=p.beta))
    result = dpo(cfg)
    say("eval tone: greedy replies of the SFT model and the DPO model on held-out prompts")
    seed = world_seed(ctx.cfg.data.source)
    before = answer_tone(sft_model, n_per_type=p.tone_n, world_seed=seed)
    after = answer_tone(str(ctx.run_dir / "dpo" / "model"), n_per_type=p.tone_n, world_seed=seed)
    ctx.results["dpo"] = {"model": str(ctx.run_dir / "dpo" / "model"), "test": result["test"],
                          "tone": {"sft": before["all"], "dpo": after["all"]}, "train_s": result["train_s"]}
    for out, model in ((before, sft_model), (after, str(ctx.run_dir / "dpo" / "model"))):
        cmd = ["lmforge", "eval", "tone", "--model", model, "--n", str(p.tone_n)]
        ctx.reproduce.append((tone_line(out), shlex.join(cmd + (["--world-seed", str(seed)] if seed else []))))
    plotted = _curves(ctx.run_dir / "dpo", "DPO")
    rows = [{"model": name, "rude or evasive": o["all"]["rude_or_evasive"], "rude": o["all"]["rude"],
             "evasive": o["all"]["evasive"], "on the rude phrasing": o["rude_phrasing"]["rude_or_evasive"],
             "exact match": o["all"]["exact_match"], "replies": o["all"]["n"]}
            for name, o in (("SFT", before), ("DPO", after))]
    samples = []
    for s in after["samples"]:
        samples += [f"*{s['type']}* ({s['tone']}):", "", "```text", f"user: {s['prompt']}",
                    f"assistant: {s['reply']}", "```", ""]
    ctx.report.add("DPO", "\n".join([
        f"The SFT model trained on the same pairs by DPO (sigmoid loss, β {p.beta}"
        + (f", plus RPO's NLL term on the chosen answer with weight {p.sft_weight}" if p.sft_weight else "")
        + f"; reference: a frozen copy of the SFT model) for {cfg.max_steps} steps of {p.global_batch_size} pairs, "
        f"lr {p.dpo_lr}.  Run dir: `dpo/`.", "",
        "![DPO curves](dpo/curves.png)" if plotted else "_(install matplotlib for the curves)_", "",
        "Held-out preference accuracy of the implicit reward β·log(π/π_ref) (ties half; at step 0 every pair is a "
        "tie):", "", _kinds_table(result["test"], "held-out accuracy"), "",
        f"Greedy replies to {before['all']['n']} held-out-entity instruction prompts, each to the end of its turn "
        f"(`lmforge eval tone`):", "", markdown_table(rows), "",
        "DPO's replies on the phrasing the SFT data is rude on:", "", *samples]))


def _estimate(ctx: Context, steps_of) -> Optional[float]:
    # a pair step runs chosen and rejected (plus a reference pass): about three SFT conversations' work per pair
    sft = ctx.results.get("sft")
    if not runs(ctx):
        return 0.0
    if not sft or not sft.get("train_s") or not ctx.cfg.sft.max_steps:
        return None
    per_conv = sft["train_s"] / (ctx.cfg.sft.max_steps * ctx.cfg.sft.global_batch_size)
    p = ctx.cfg.preferences
    return steps_of(p) * p.global_batch_size * 3 * per_conv


def _describe(what: str):
    def describe(ctx: Context) -> str:
        if not ctx.cfg.preferences.enabled:
            return "skipped (preferences.enabled=false)"
        return what if ctx.results.get("sft", {}).get("model") else "skipped (no SFT model)"
    return describe


REWARD_STAGE = Stage("reward", stage_reward,
                     _describe("a reward model from the SFT model on world preference pairs, held-out accuracy per "
                               "kind"), lambda c: _estimate(c, lambda p: p.reward_steps))
DPO_STAGE = Stage("dpo", stage_dpo,
                  _describe("DPO of the SFT model on the same pairs; held-out accuracy per kind and the tone of its "
                            "replies beside the SFT model's"), lambda c: _estimate(c, lambda p: p.dpo_steps))
