"""The ``lmforge`` command line: parse, call a recipe, print.  Nothing else lives here.

Every user-caused error is an :class:`~lmforge.core.errors.LmforgeError`; it is printed as one line
(``error: ...``) and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from lmforge import __version__
from lmforge.apps.chat import one_turn, run_chat
from lmforge.apps.pipeline import run_pipeline
from lmforge.apps.report import (instructions_tables, write_bench_peft_report, write_finetune_report,
                                 write_w2s_report)
from lmforge.apps.scaling_report import write_scaling_report
from lmforge.core.errors import RESUME_HINT, LmforgeError, user_error
from lmforge.core.outputs import check_output_file, running
from lmforge.core.tokenizer import vocabulary_note
from lmforge.data.cache import cache_entries, clear_cache, human_bytes, other_entries
from lmforge.data.readers import TXT_SPLITS
from lmforge.data.shards import train_tokenizer
from lmforge.data.sources import cache_root
from lmforge.data.world import write_corpus
from lmforge.recipes.bench_peft import run_bench_peft
from lmforge.recipes.incontext import format_table, run_choice, run_harness_command
from lmforge.recipes.evaluate import EVAL_TXT_SPLIT, run_fill_mask, run_generate, run_perplexity
from lmforge.recipes.finetune import run_compare, run_finetune
from lmforge.recipes.instructions import evaluate_instructions
from lmforge.recipes.merge import merge
from lmforge.recipes.pretrain import run_pretrain
from lmforge.recipes.dpo import run_dpo
from lmforge.recipes.grpo import run_grpo
from lmforge.recipes.ppo import run_ppo
from lmforge.recipes.reward import evaluate_reward, run_reward
from lmforge.recipes.scaling_fit import FitOptions, summary_lines
from lmforge.recipes.scaling_fit import fit as fit_scaling
from lmforge.recipes.scaling_sweep import run_scaling_sweep
from lmforge.recipes.sft import inspect_data, run_sft
from lmforge.recipes.tone import answer_tone, tone_line
from lmforge.recipes.w2s import run_w2s
from lmforge.train.distributed import require_single_process, shutdown

TRAINING_EPILOG = (
    "CONFIG is a YAML file (see configs/); any key can be overridden with dotted key=value pairs, e.g. "
    "`train.lr=3e-4 max_steps=200 run_dir=runs/x`. Top-level keys of every training command: run_dir, seed, "
    "max_steps, resume (auto|true|false)."
)


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as every other error: one ``error:`` line naming the command, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low`` (a count or size), refused at parse time by the flag's name."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value
    return parse


def _add_training_command(sub, name: str, help_text: str, config_optional: bool = False) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=TRAINING_EPILOG)
    p.add_argument("config", nargs="?" if config_optional else None, help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmforge",
        description="lmforge: a language model through its whole life — tokenizer, pretraining, evaluation, "
        "generation — on your data or the built-in world.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # tokenizer
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer", description="Tokenizer tools.")
    tok_sub = tok.add_subparsers(dest="tok_command", metavar="SUBCOMMAND")
    tt = tok_sub.add_parser("train", help="train byte-level BPE on a corpus",
                            description="Train a byte-level BPE tokenizer (HF tokenizers) and save tokenizer.json "
                            "+ tokenizer_config.json into --out.")
    tt.add_argument("--data", default="world", help="text source: file, folder, glob, HF dataset dir or 'world' (default)")
    tt.add_argument("--field", default="text", help="field/column for .jsonl/.csv/.parquet (default: text)")
    tt.add_argument("--vocab-size", type=_at_least(1), default=8192)
    tt.add_argument("--special-tokens", nargs="*", default=None, help="default: <|endoftext|> <|pad|>")
    tt.add_argument("--max-bytes", type=_at_least(1), default=None, help="train on at most this many bytes of text")
    tt.add_argument("--out", required=True, help="output directory (new or empty; never a model dir)")
    tt.add_argument("--force", action="store_true",
                    help="write into an --out that holds files (tokenizer.json/tokenizer_config.json are replaced, "
                    "nothing else)")

    # training commands
    _add_training_command(sub, "pretrain", "pretrain a language model — GPT-2/Llama causal LM, BERT masked LM + "
                          "next sentence, T5 span corruption (+ text infilling) — on the built-in world by "
                          "default")
    _add_training_command(sub, "pipeline", "tokenizer → pretrain → eval → samples → finetune on the built-in world, with a "
                          "report (RUN_DIR/report.md)", config_optional=True)

    ft = _add_training_command(
        sub, "finetune", "fine-tune a pretrained model (lmforge run or HF dir) on a task: classification, token "
        "classification, text-to-text / prompt→completion — a world task by default", config_optional=True)
    ft.add_argument("--compare", action="store_true",
                    help="run pretrained and random-init fine-tuning over compare.seeds and report them side by side "
                    "with the majority and bag-of-words baselines")

    # supervised fine-tuning on conversations, and chat
    _add_training_command(sub, "sft", "supervised fine-tuning of a decoder on conversations (messages, ShareGPT, "
                          "Alpaca, prompt/completion; a world QA task by default) in its chat template, loss on "
                          "the assistant's turns; full or any delta method (peft:), packed or padded",
                          config_optional=True)
    _add_training_command(sub, "reward", "train a pairwise reward model (Bradley-Terry, optional margin and reward "
                          "centring, K-way rankings) on preference pairs from an SFT model; saved as transformers' "
                          "*ForSequenceClassification with one output", config_optional=True)
    _add_training_command(sub, "dpo", "learn from preference pairs against a frozen reference: DPO (sigmoid), cdpo, "
                          "robust, hinge, ipo, simpo, + RPO's sft term; the reference a copy, the policy with its "
                          "delta off, or log-probs precomputed", config_optional=True)
    _add_training_command(sub, "grpo", "RL with group-relative advantages (GRPO): G answers per prompt on the "
                          "generation engine, rewards from the world's verifiers, a reward model or module:function, "
                          "clipped loss (grpo, bnpo, dr_grpo, dapo), optional k3 KL to a reference",
                          config_optional=True)
    _add_training_command(sub, "ppo", "RL with PPO and a KL leash: per-token KL penalty (fixed or adaptive), the score "
                          "on the answer's last token, GAE, clipped policy and value losses, a value head on the "
                          "policy or a separate critic", config_optional=True)
    _add_training_command(sub, "w2s", "the weak-to-strong experiment (Burns et al. 2023): a weak model fine-tuned on "
                          "ground truth labels data for a strong one (soft-label CE, the auxiliary confidence loss), "
                          "against the strong ceiling; PGR per seed with bootstrap intervals (RUN_DIR/report.md)")
    ins = sub.add_parser("inspect-data", help="show SFT examples as rendered, supervised tokens marked [[...]]",
                         description="Render the first N training conversations of an SFT config with the model's "
                         "chat template, mark the supervised tokens [[like this]], and count the conversations "
                         "truncated and dropped by data.max_length.", epilog=TRAINING_EPILOG)
    ins.add_argument("config", nargs="?", help="YAML config file (an sft config)")
    ins.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    ins.add_argument("-n", type=_at_least(0), default=3, help="examples to show (default 3)")
    ins.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ch = sub.add_parser("chat", help="chat with a model in the terminal (its chat template, streamed replies)",
                        description="A terminal chat: each line is a user message, the reply streams. Commands: "
                        "/reset (clear the history), /system TEXT (set the system prompt), /history, /quit.")
    ch.add_argument("--model", required=True, help="a model dir with a chat template (e.g. RUN_DIR/model of lmforge sft)")
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--max-new-tokens", type=int, default=128)
    ch.add_argument("--temperature", type=float, default=0.0)
    ch.add_argument("--top-k", type=int, default=0)
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--repetition-penalty", type=float, default=1.0)
    ch.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--device", default="auto")

    # eval
    ev = sub.add_parser("eval", help="evaluate a model", description="Evaluate a model.")
    ev_sub = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    pp = ev_sub.add_parser("perplexity", help="perplexity and bits-per-byte on a text file or dataset",
                           description="Decoders: perplexity with the fixed-length-model method (windows of "
                           "--max-length tokens advancing by --stride; tokens scored by an earlier window are context "
                           "only) and bits-per-byte.  bert: pseudo-perplexity.  t5: span-corruption loss.  The text "
                           "is tokenised as the model's tokenizer does it, BOS only where the tokenizer itself adds "
                           "one (Llama's do, GPT-2's do not), as the transformers perplexity guide does; several "
                           "documents are joined with EOS.  A .txt file is one document, exactly as written.  The "
                           "window and stride used are printed.")
    pp.add_argument("--model", required=True, help="lmforge model dir or Hugging Face checkpoint dir")
    pp.add_argument("--data", required=True, help="text file, folder, glob, .jsonl/.csv/.parquet, HF dataset dir or 'world'")
    pp.add_argument("--field", default="text")
    pp.add_argument("--txt-split", choices=list(TXT_SPLITS), default=EVAL_TXT_SPLIT,
                    help="how a .txt file becomes documents: the whole file as written (default), its "
                    "blank-line-separated paragraphs, or its lines")
    pp.add_argument("--max-length", type=int, default=None,
                    help="window length (default: the window the model was trained with, recorded in its dir by "
                    "lmforge; else the model's context)")
    pp.add_argument("--stride", type=int, default=None, help="window advance (default: half the window)")
    pp.add_argument("--batch-size", type=_at_least(1), default=8)
    pp.add_argument("--max-docs", type=_at_least(1), default=None, help="score only the first N documents")
    pp.add_argument("--device", default="auto")
    pp.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    rw = ev_sub.add_parser("reward", help="a reward model's accuracy on preference pairs",
                           description="Score preference pairs with a reward model dir (lmforge reward's RUN_DIR/model "
                           "or any *ForSequenceClassification with one output): accuracy (ties count half), per kind "
                           "where the data names kinds, and the mean scores.")
    rw.add_argument("--model", required=True, help="reward model dir (or a run dir with model/)")
    rw.add_argument("--data", default="world-preferences",
                    help="preference file (.jsonl/.json/.csv/.parquet or datasets dir) or world-preferences (held-out "
                    "pairs, the default)")
    rw.add_argument("--max-length", type=_at_least(2), default=None)
    rw.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    mc = ev_sub.add_parser(
        "choice", help="zero/few-shot accuracy by log-likelihood (multiple choice) or exact match (generative)",
        description="In-context evaluation as lm-evaluation-harness scores it: each choice's log-likelihood after the "
        "prompt (acc; acc_norm: divided by the choice's length in characters; acc_bytes: by its UTF-8 bytes), each "
        "prompt's context run once for all its choices; generative tasks by greedy decoding to a stop string, "
        "judged by the world's verifier.  k demonstrations drawn with --fewshot-seed, never the evaluated example.")
    mc.add_argument("--model", required=True, help="decoder model dir (lmforge or Hugging Face)")
    mc.add_argument("--tasks", nargs="+", required=True,
                    help="world tasks (world-fact, world-arithmetic, world-kind, world-true-false, world-sentiment, "
                    "world-topic, world-fact-gen, world-arithmetic-gen) or .jsonl files of {question, choices, answer}")
    mc.add_argument("--num-fewshot", "-k", type=_at_least(0), nargs="+", default=[0], metavar="K",
                    help="demonstrations per prompt (several: one column each), default 0")
    mc.add_argument("--limit", type=_at_least(1), default=200, help="examples per task (default 200)")
    mc.add_argument("--pool", type=_at_least(1), default=64, help="demonstrations a world task draws from")
    mc.add_argument("--fewshot-seed", type=int, default=1234)
    mc.add_argument("--description", default="", help="text before the demonstrations")
    mc.add_argument("--target-delimiter", default=" ")
    mc.add_argument("--fewshot-delimiter", default="\n\n")
    mc.add_argument("--stop", action="append", help="stop string of generative tasks (default a newline)")
    mc.add_argument("--max-new-tokens", type=_at_least(1), default=16)
    mc.add_argument("--batch-tokens", type=_at_least(16), default=4096)
    mc.add_argument("--max-length", type=_at_least(2), default=None,
                    help="inputs longer than this are cut on the left, as lm-eval does (default: the window the model "
                    "was trained with, recorded in its dir by lmforge; else the model's positions)")
    mc.add_argument("--device", default="auto")
    mc.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    hv = ev_sub.add_parser(
        "harness", help="run lm-evaluation-harness tasks on an lmforge or HF model dir",
        description="Registers lmforge's model type 'lmforge' with lm-evaluation-harness and runs "
        "lm_eval.simple_evaluate (needs the extra: pip install 'lmforge[harness]').  Tasks come from lm-eval's "
        "registry or --include-path; nothing is downloaded that the task does not ask for.")
    hv.add_argument("--model", required=True, help="decoder model dir (lmforge or Hugging Face)")
    hv.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names")
    hv.add_argument("--num-fewshot", type=_at_least(0), default=None)
    hv.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    hv.add_argument("--include-path", default=None, help="a folder of lm-eval task YAMLs")
    hv.add_argument("--fewshot-seed", type=int, default=1234)
    hv.add_argument("--gen-kwargs", default=None, help="lm-eval's generation arguments, e.g. temperature=0")
    hv.add_argument("--model-type", choices=["lmforge", "hf"], default="lmforge",
                    help="lmforge's scorer (default) or lm-eval's own HFLM on the same dir")
    hv.add_argument("--batch-tokens", type=_at_least(16), default=4096)
    hv.add_argument("--log-samples", action="store_true")
    hv.add_argument("--device", default="auto")
    hv.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    et = ev_sub.add_parser("tone", help="share of rude and evasive greedy replies on held-out instruction prompts",
                           description="Greedy replies, each to the end of its turn, to the built-in world's held-out-"
                           "entity instruction records: the share of rude, evasive, polite and plain replies (on every "
                           "phrasing and on the one the SFT data is rude on) and the verifier's exact match.")
    et.add_argument("--model", required=True, help="a chat model dir (or a run dir with model/)")
    et.add_argument("--n", type=_at_least(1), default=10, help="records per task type (default 10)")
    et.add_argument("--seed", type=int, default=0, help="the seed the SFT data was built with (entity split)")
    et.add_argument("--world-seed", type=int, default=0)
    et.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ei = ev_sub.add_parser("instructions", help="exact match per instruction task type on held-out entities, "
                           "phrasings and task types",
                           description="Greedy answers to the built-in world's held-out instruction records, scored by "
                           "their verifiers: --model zero-shot in its chat template; --base (its base model) zero-shot "
                           "and few-shot, in its template or as plain Q:/A: text when it has none.  Per task type and "
                           "per kind (in-context, closed-book), on held-out entities, held-out phrasings and held-out "
                           "task types.")
    ei.add_argument("--model", required=True, help="the SFT model dir (or a run dir with model/)")
    ei.add_argument("--base", default=None, help="its base model dir, scored zero- and few-shot beside it")
    ei.add_argument("--n", type=_at_least(1), default=20, help="records per task type and split (default 20)")
    ei.add_argument("--shots", type=_at_least(0), default=3, help="demonstrations in the base's few-shot prompts")
    ei.add_argument("--seed", type=int, default=0, help="the seed the SFT data was built with (entity split)")
    ei.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    # generate
    ge = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)",
                        description="Generate a completion with the KV-cached engine; --temperature 0 is greedy.")
    ge.add_argument("--model", required=True, help="lmforge model dir or Hugging Face checkpoint dir")
    ge.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    ge.add_argument("--chat", default=None, metavar="TEXT",
                    help="one chat turn instead of a prompt: TEXT as a user message in the model's chat template")
    ge.add_argument("--max-new-tokens", type=int, default=64)
    ge.add_argument("--temperature", type=float, default=0.0)
    ge.add_argument("--top-k", type=int, default=0)
    ge.add_argument("--top-p", type=float, default=1.0)
    ge.add_argument("--repetition-penalty", type=float, default=1.0)
    ge.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    ge.add_argument("--seed", type=int, default=None)
    ge.add_argument("--device", default="auto")
    ge.add_argument("--no-stream", action="store_true", help="print the completion at the end only")
    ge.add_argument("--json", action="store_true", help="print results as one JSON object as the last line")

    # fill-mask
    fm = sub.add_parser("fill-mask", help="top-k predictions for each [MASK] of a text (bert models)",
                        description="Masked-LM inference: the top-k tokens and probabilities for each [MASK].")
    fm.add_argument("--model", required=True, help="lmforge or Hugging Face bert model dir")
    fm.add_argument("--text", required=True, help="text with one or more [MASK] tokens")
    fm.add_argument("--top-k", type=int, default=5)
    fm.add_argument("--device", default="auto")
    fm.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    # bench
    be = sub.add_parser("bench", help="side-by-side benchmarks (bench peft: full fine-tuning vs every delta method)",
                        description="Benchmarks that run lmforge recipes side by side.")
    be_sub = be.add_subparsers(dest="bench_command", metavar="SUBCOMMAND")
    bp = be_sub.add_parser("peft", help="full fine-tuning and each delta method on one model and task, over seeds",
                           description="Fine-tune one pretrained model on one task with full fine-tuning and each "
                           "delta method (each run in its own process); write RUN_DIR/report.md, bench.json and "
                           "bench.png: trainable parameters, accuracy, training memory, time, saved size.",
                           epilog="Keys: run_dir, finetune (the base fine-tuning config), methods "
                           "(full, lora, dora, houlsby, pfeiffer, bitfit), seeds, lr (per method), delta_lr (unset: each "
                           "method's default), "
                           "overrides (key=value list passed to every run), timeout_s.")
    bp.add_argument("config", nargs="?", help="YAML config file")
    bp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    # scaling
    sc = sub.add_parser("scaling", help="scaling-law studies: an IsoFLOP sweep of pretraining runs, Chinchilla fits",
                        description="Scaling-law studies (Hoffmann et al. 2022): sweep budgets × model sizes, fit.")
    sc_sub = sc.add_subparsers(dest="scaling_command", metavar="SUBCOMMAND")
    ss = sc_sub.add_parser("sweep", help="pretrain budgets × model sizes on an IsoFLOP grid (each run its own process)",
                           description="Train every (compute budget, model size) of an IsoFLOP grid with lmforge "
                           "pretrain (fresh tokens, schedule scaled to the run's tokens, final validation loss); "
                           "finished runs are reused, interrupted ones resumed; writes RUN_DIR/points.csv, "
                           "sweep.json, and the fits' report.md + PNGs.",
                           epilog="Keys: run_dir, pretrain (the base pretraining config), overrides, budgets (FLOPs), "
                           "sizes (list of model.* dicts), n_params (non_embedding|total), min_steps, "
                           "warmup_fraction, jobs, timeout_s, reuse, fit (the fit's keys, as `scaling fit`).")
    ss.add_argument("config", nargs="?", help="YAML config file")
    ss.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    sf = sc_sub.add_parser("fit", help="Chinchilla approaches 2 and 3 on a sweep's points or a CSV (N, D or C, loss)",
                           description="Fit approach 2 (a parabola per IsoFLOP curve in log N, then N_opt(C), "
                           "D_opt(C) power laws) and approach 3 (L = E + A/N^alpha + B/D^beta, Huber delta=1e-3 on "
                           "log loss, batched L-BFGS from a grid of starts, bootstrap intervals); print the "
                           "compute-optimal N, D and tokens per parameter at a budget; write report.md + PNGs.")
    sf.add_argument("data", help="a scaling sweep's run dir, or a CSV with columns N, D or C, and loss")
    sf.add_argument("--approach", choices=["2", "3", "both"], default="both")
    sf.add_argument("--drop-highest", type=_at_least(0), default=0, metavar="K",
                    help="leave out the K highest-loss points (Epoch AI drop 5 of Chinchilla's)")
    sf.add_argument("--grid", choices=["full", "small"], default="full",
                    help="approach 3's starts: the 4,500-point grid of Besiroglu et al. 2024, or 72")
    sf.add_argument("--bootstrap", type=_at_least(0), default=0, metavar="B", help="bootstrap resamples (0: none)")
    sf.add_argument("--budget", type=float, default=None, help="FLOPs for the compute-optimal N and D (default: "
                    "the largest C in the data)")
    sf.add_argument("--out", default=None, help="directory for report.md, fit.json and the PNGs (default: the "
                    "sweep's run dir; none for a CSV)")
    sf.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    # merge
    me = sub.add_parser("merge", help="bake a LoRA/DoRA/BitFit delta into its base model (a plain HF model dir)",
                        description="Load BASE, apply the delta in ADAPTER (PEFT's LoRA/DoRA format or lmforge's own), "
                        "merge it into the weights and save a plain Hugging Face model directory to OUT.")
    me.add_argument("--base", required=True, help="the base model dir (or run dir) the delta was trained on")
    me.add_argument("--adapter", required=True, help="the delta dir (e.g. RUN_DIR/adapter of a fine-tuning run)")
    me.add_argument("--out", required=True, help="output model dir (new or empty; not the base, the adapter or a run dir)")
    me.add_argument("--force", action="store_true",
                    help="write into an --out that holds files (the model's files are replaced, nothing else)")
    me.add_argument("--no-check-base", action="store_true",
                    help="skip the check that BASE is the model the delta was trained on")

    # cache
    ca = sub.add_parser("cache", help="list or clear lmforge's cache (world corpora, token shards)",
                        description="lmforge caches built-in world corpora and token shards in $LMFORGE_CACHE "
                        "(default ~/.cache/lmforge), shared by every run; everything there is rebuilt when needed.")
    ca_sub = ca.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    cl = ca_sub.add_parser("list", help="what the cache holds: each entry, its size, the total",
                           description="List lmforge's entries in $LMFORGE_CACHE with their sizes and the total.")
    cl.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    cc = ca_sub.add_parser("clear", help="remove lmforge's cache entries (needs --yes)",
                           description="Remove lmforge's own entries from $LMFORGE_CACHE (world corpora, token shards, "
                           "unfinished shard builds); any other file in that directory is kept.")
    cc.add_argument("--yes", action="store_true", help="really remove them (without it: refused, nothing removed)")

    # world
    wo = sub.add_parser("world", help="write the built-in synthetic world corpus to a JSONL file",
                        description="Write documents of the built-in world (encyclopedia entries, stories, "
                        "dialogues, lists, arithmetic) to a JSONL file with a 'text' field.")
    wo.add_argument("--out", required=True, help="the JSONL file to write (refused if it exists, unless --force)")
    wo.add_argument("--force", action="store_true", help="replace an existing --out file")
    wo.add_argument("--seed", type=int, default=0)
    wo.add_argument("--bytes", type=_at_least(1), default=10_000_000, help="approximate size of text to write")
    return parser


def _cmd_tokenizer(args) -> int:
    if args.tok_command != "train":
        raise LmforgeError("usage: lmforge tokenizer train --data PATH --vocab-size N --out DIR")
    tok = train_tokenizer(args.data, args.vocab_size, args.out, special_tokens=args.special_tokens,
                          max_bytes=args.max_bytes, field=args.field, overwrite=args.force)
    note = vocabulary_note(tok)
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(f"saved tokenizer ({tok.vocab_size} tokens, fingerprint {tok.fingerprint[:12]}) to {args.out}")
    return 0


def _cmd_pretrain(args) -> int:
    result = run_pretrain(args.config, args.overrides)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        print(json.dumps(result))
    return 0


def _cmd_pipeline(args) -> int:
    result = run_pipeline(args.config, args.overrides)
    print(json.dumps(result))
    return 0


def _cmd_finetune(args) -> int:
    if args.compare:
        require_single_process("finetune --compare")
    result = (run_compare if args.compare else run_finetune)(args.config, args.overrides)
    if not result:  # under torchrun, ranks other than 0 leave scoring, saving and the report to rank 0
        return 0
    path = write_finetune_report(result)
    brief = {k: result.get(k) for k in ("run_dir", "task", "family", "test", "summary", "pretrained_minus_random")
             if k in result}
    print(json.dumps({**brief, "report": str(path)}))
    return 0


def _cmd_w2s(args) -> int:
    result = run_w2s(args.config, args.overrides)
    path = write_w2s_report(result)
    print(json.dumps({"run_dir": result["run_dir"], "task": result["task"], "pgr": [
        {k: r[k] for k in ("student", "pgr_median", "pgr_interval")} for r in result["pgr"]], "report": str(path)}))
    return 0


def _cmd_eval(args) -> int:
    if args.eval_command == "choice":
        out = run_choice(args)
        header, rows = out.pop("table")
        if args.json:
            print(json.dumps(out))
        else:
            print(format_table(header, rows))
        return 0
    if args.eval_command == "harness":
        res = run_harness_command(args)
        summary = {"model": args.model, "results": res["results"]}
        if not args.json:
            for task, metrics in res["results"].items():
                shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                print(f"{task}: {shown}")
        else:
            print(json.dumps(summary, default=str))
        return 0
    if args.eval_command == "tone":
        out = answer_tone(args.model, n_per_type=args.n, seed=args.seed, world_seed=args.world_seed)
        print(json.dumps(out) if args.json else tone_line(out))
        return 0
    if args.eval_command == "instructions":
        out = evaluate_instructions(args.model, args.base, n_per_type=args.n, shots=args.shots, seed=args.seed)
        if args.json:
            print(json.dumps(out))
        else:
            print(instructions_tables(out))
        return 0
    if args.eval_command == "reward":
        out = evaluate_reward(args.model, args.data, args.max_length)
        if not args.json:
            for kind, row in out["accuracy"].items():
                print(f"{kind:<12} accuracy {row['accuracy']:.3f}  ({row['pairs']} pairs)")
            print(f"mean score: chosen {out['mean_chosen']:.3f}, rejected {out['mean_rejected']:.3f}")
        else:
            print(json.dumps(out))
        return 0
    if args.eval_command != "perplexity":
        raise LmforgeError("usage: lmforge eval perplexity|reward|instructions --model DIR ... (see lmforge eval --help)")
    result = run_perplexity(args)
    if args.json:
        print(json.dumps(result))
        return 0
    bpb = "" if result["bits_per_byte"] is None else f"  bits/byte {result['bits_per_byte']:.4f}"
    stride = "" if result["stride"] is None else f", stride {result['stride']}"
    print(f"{result.get('kind', 'perplexity')} {result['perplexity']:.4f}{bpb}  tokens {result['tokens']}  "
          f"(window {result['window']} = {result['window_from']}{stride})")
    return 0


def _cmd_generate(args) -> int:
    if (args.chat is None) == (not args.prompt):
        raise LmforgeError("lmforge generate: give --prompt TEXT (repeatable) or --chat TEXT, not both")
    if args.chat is not None:
        one_turn(args)
        return 0
    run_generate(args)
    return 0


def _cmd_sft(args) -> int:
    require_single_process("sft")  # its Trainer is not wired to a process group yet
    result = run_sft(args.config, args.overrides)
    print(json.dumps({k: result.get(k) for k in ("run_dir", "last", "data", "packing", "masking", "added_tokens",
                                                 "stop_ids", "delta") if k in result}))
    return 0


def _preference_summary(result: dict) -> None:
    for kind, row in (result.get("test") or {}).items():
        print(f"held-out {kind:<12} accuracy {row['accuracy']:.3f}  ({row['pairs']} pairs)", file=sys.stderr)
    print(json.dumps({k: result.get(k) for k in ("run_dir", "last", "data", "test", "reference", "reference_forwards",
                                                 "reference_precomputed",
                                                 "delta") if k in result}))


def _cmd_reward(args) -> int:
    require_single_process("reward")  # its Trainer is not wired to a process group yet
    _preference_summary(run_reward(args.config, args.overrides))
    return 0


def _cmd_dpo(args) -> int:
    require_single_process("dpo")
    _preference_summary(run_dpo(args.config, args.overrides))
    return 0


def _rl_summary(result: dict) -> None:
    start, last = result.get("start") or {}, result.get("last") or {}
    if "eval/accuracy" in start and "eval/accuracy" in last:
        print(f"held-out accuracy {start['eval/accuracy']:.3f} -> {last['eval/accuracy']:.3f}", file=sys.stderr)
    print(json.dumps({k: result.get(k) for k in ("run_dir", "algorithm", "prompts", "start", "last", "delta")
                      if k in result}))


def _cmd_grpo(args) -> int:
    _rl_summary(run_grpo(args.config, args.overrides))
    return 0


def _cmd_ppo(args) -> int:
    _rl_summary(run_ppo(args.config, args.overrides))
    return 0


def _cmd_inspect_data(args) -> int:
    out = inspect_data(args.config, args.overrides, args.n)
    if args.json:
        print(json.dumps(out))
        return 0
    for i, ex in enumerate(out["examples"]):
        print(f"--- example {i}: {ex['tokens']} tokens, {ex['supervised']} supervised")
        print(ex["rendered"])
    for split, c in out["counts"].items():
        print(f"{split}: {c['conversations']} conversations, {c['truncated']} truncated, {c['dropped']} dropped "
              f"(max_length {out['max_length']}; masks from {out['masking']})")
    return 0


def _cmd_chat(args) -> int:
    return run_chat(args)


def _cmd_fill_mask(args) -> int:
    run_fill_mask(args)
    return 0


def _cmd_bench(args) -> int:
    if args.bench_command != "peft":
        raise LmforgeError("usage: lmforge bench peft [CONFIG] [key=value ...]")
    # each run's process writes its report.md, as `lmforge finetune` does
    out = run_bench_peft(args.config, args.overrides, run_report=write_finetune_report)
    path = write_bench_peft_report(out)
    print(json.dumps({"run_dir": out["run_dir"], "report": str(path),
                      "test_accuracy": {r["method"]: r["test_accuracy"] for r in out["summary"]}}))
    return 0


def _cmd_scaling(args) -> int:
    if args.scaling_command == "sweep":
        out = run_scaling_sweep(args.config, args.overrides, say=lambda text: print(text, file=sys.stderr, flush=True))
        fitted = fit_scaling(out["run_dir"], FitOptions(bootstrap=out["config"]["bootstrap"]))
        path = write_scaling_report(fitted, out["run_dir"], title=f"Scaling sweep {out['run_dir']}")
        print("\n".join(summary_lines(fitted)), file=sys.stderr)
        print(json.dumps({"run_dir": out["run_dir"], "points": len(out["points"]), "report": str(path)}))
        return 0
    if args.scaling_command != "fit":
        raise LmforgeError("usage: lmforge scaling sweep CONFIG [key=value ...] | lmforge scaling fit DATA [--json]")
    fitted = fit_scaling(args.data, FitOptions(approach=args.approach, drop_highest=args.drop_highest, grid=args.grid,
                                               bootstrap=args.bootstrap, budget=args.budget))
    out_dir = args.out or (args.data if os.path.isdir(args.data) else None)
    if out_dir:
        fitted["report"] = str(write_scaling_report(fitted, out_dir))
    print("\n".join(summary_lines(fitted)), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({k: v for k, v in fitted.items() if k != "points"}))
    return 0


def _cmd_merge(args) -> int:
    out = merge(args.base, args.adapter, args.out, check_base=not args.no_check_base, force=args.force)
    print(f"merged {args.adapter} into {args.base}: saved {out}")
    return 0


def _cmd_cache(args) -> int:
    root = cache_root()
    if args.cache_command == "list":
        entries, others = cache_entries(root), other_entries(root)
        total = sum(e.bytes for e in entries)
        if args.json:
            print(json.dumps({"cache": str(root), "total_bytes": total, "others": [str(p) for p in others],
                              "entries": [{"path": str(e.path), "kind": e.kind, "bytes": e.bytes, "about": e.about}
                                          for e in entries]}))
            return 0
        print(f"lmforge cache: {root} (set LMFORGE_CACHE to move it)")
        for e in entries:
            print(f"  {human_bytes(e.bytes):>9}  {e.kind:<17} {e.path.relative_to(root)}  ({e.about})")
        print(f"total {human_bytes(total)} in {len(entries)} entries" +
              (f"; {len(others)} other entries there are not lmforge's and stay" if others else ""))
        return 0
    if args.cache_command == "clear":
        removed = clear_cache(root, yes=args.yes)
        print(f"removed {len(removed)} entries ({human_bytes(sum(e.bytes for e in removed))}) from {root}")
        return 0
    raise LmforgeError("usage: lmforge cache list [--json] | lmforge cache clear --yes")


def _cmd_world(args) -> int:
    check_output_file(args.out, force=args.force, what=f"--out '{args.out}'")
    path = write_corpus(args.out, seed=args.seed, target_bytes=args.bytes)
    print(f"wrote {os.path.getsize(path):,} bytes to {path}")
    return 0


TRAINING_COMMANDS = ("pretrain", "pipeline", "finetune", "bench", "sft", "reward", "dpo", "grpo", "ppo", "scaling",
                     "w2s")
"""The commands that write checkpoints: an interrupted or disk-full one says how its run goes on."""

COMMANDS: dict[str, Callable] = {
    "tokenizer": _cmd_tokenizer,
    "pretrain": _cmd_pretrain,
    "pipeline": _cmd_pipeline,
    "finetune": _cmd_finetune,
    "eval": _cmd_eval,
    "generate": _cmd_generate,
    "fill-mask": _cmd_fill_mask,
    "merge": _cmd_merge,
    "scaling": _cmd_scaling,
    "bench": _cmd_bench,
    "world": _cmd_world,
    "cache": _cmd_cache,
    "sft": _cmd_sft,
    "reward": _cmd_reward,
    "dpo": _cmd_dpo,
    "grpo": _cmd_grpo,
    "ppo": _cmd_ppo,
    "w2s": _cmd_w2s,
    "inspect-data": _cmd_inspect_data,
    "chat": _cmd_chat,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `lmforge finetune CONFIG --compare a=1 b=2`: overrides after a flag are still overrides.
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)  # the usual "unrecognized arguments" error and exit
    if not args.command:
        parser.print_help()
        return 0
    sub_command = next((getattr(args, k) for k in ("tok_command", "eval_command", "bench_command", "cache_command",
                                                   "scaling_command")
                        if getattr(args, k, None)), None)
    try:
        with running(" ".join(filter(None, (args.command, sub_command)))):  # recorded in what the command writes
            status = COMMANDS[args.command](args)
        if "WORLD_SIZE" in os.environ:  # under torchrun: leave the process group together
            shutdown()
        return status
    except LmforgeError as e:
        return _report(e)
    except (OSError, RuntimeError) as e:  # a full disk, an unwritable path: the user's; anything else is a bug
        error = user_error(e, training=args.command in TRAINING_COMMANDS)
        if error is None:
            raise
        return _report(error)
    except KeyboardInterrupt:
        hint = f"; {RESUME_HINT}" if args.command in TRAINING_COMMANDS else ""
        print(f"error: interrupted (Ctrl-C){hint}", file=sys.stderr)
        return 130


def _report(e: LmforgeError) -> int:
    """Print ``e`` as the one ``error:`` line (under torchrun, prefixed with the rank) and return its exit code."""
    world = os.environ.get("WORLD_SIZE", "1")
    where = f"[rank {os.environ.get('RANK', '?')}/{world}] " if world not in ("", "1") else ""
    print(f"error: {where}{e}", file=sys.stderr)
    return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
