"""A tiny `lmforge pipeline` run (seconds), once per module: what it prints, and its report without gaps — every
link resolves, the curves hold every logged point, and the report's reproduce command prints the report's number."""

import json
import re
import shlex

import pytest

from tests.conftest import cli, run_cli
from tests.report_checks import assert_curves_hold_every_point, assert_links_resolve, assert_perplexity_reproduces

TINY = ["max_steps=10", "data.world_bytes=300000", "tokenizer.train_bytes=150000", "model.vocab_size=512",
        "model.d_model=32", "model.n_layer=1", "model.n_head=2", "data.seq_len=32", "train.global_batch_size=4",
        "train.eval_every=5", "train.ckpt_every=5", "train.eval_max_batches=2", "train.warmup_steps=2",
        "train.log_every=2", "samples.max_new_tokens=4", "finetune.max_steps=4", "finetune.n_train=64",
        "finetune.global_batch_size=8", "incontext.n=4", "incontext.tasks=[world-kind,world-arithmetic]", "sft.max_steps=3", "sft.n_train=24", "sft.global_batch_size=4", "sft.eval_n=1",
        "sft.shots=1", "preferences.reward_steps=3", "preferences.dpo_steps=3", "preferences.n_train=1",
        "preferences.tone_n=1", "preferences.global_batch_size=4", "rl.max_steps=2", "rl.n_train=4", "rl.n_eval=2",
        "rl.num_generations=2", "rl.global_batch_size=4", "rl.max_new_tokens=4", "rl.eval_every=1"]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline") / "pipe"
    proc = run_cli("pipeline", f"run_dir={run_dir}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_pipeline_runs_a_finetune_stage(pipe):
    run_dir, proc = pipe
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the JSON line stays the last line of stdout
    assert summary["finetune"]["task"] == "world-sentiment" and "accuracy" in summary["finetune"]["test"]
    assert summary["report"] == str(run_dir / "report.md")
    report = (run_dir / "report.md").read_text()
    assert "## Fine-tuning" in report and "baseline: bag of words" in report
    assert json.loads((run_dir / "finetune" / "model" / "config.json").read_text())["architectures"] == [
        "GPT2ForSequenceClassification"]


def test_pipeline_runs_an_sft_stage_later_stages_build_on(pipe):
    run_dir, proc = pipe
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    sft = summary["sft"]
    assert sft["model"] == str(run_dir / "sft" / "model")  # the contract the reward, DPO and RL stages rely on
    tokenizer_config = json.loads((run_dir / "sft" / "model" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    # every split and kind, for the SFT model and the pretrained model zero- and few-shot
    for split, kinds in (("test_entities", ("in_context", "closed_book")), ("test_phrasings", ("in_context",)),
                         ("test_types", ("in_context", "closed_book"))):
        for kind in kinds:
            for col in ("sft", "base_zero", "base_few"):
                assert 0.0 <= sft["eval"][f"{split}/{kind}/{col}"] <= 1.0
    assert 0.0 <= sft["eval"]["test_types/closed_book/base_likelihood"] <= 1.0
    assert sft["eval"]["test_types/in_context/base_likelihood"] is None  # likelihood: closed-book types only
    assert sft["step"] == 3 and len(sft["samples"]) >= 2
    report = (run_dir / "report.md").read_text()
    section = report[report.index("## SFT (instruction tuning)"):]
    assert "![SFT loss](sft/curves.png)" in section and "FLAN" in section and "### Chat samples" in section
    assert "| test_types | reverse | in_context | 1 |" in section
    metrics = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    plotted = json.loads((run_dir / "sft" / "curves.json").read_text())  # every logged SFT loss is plotted
    assert plotted["train loss"] == [[m["step"], m["loss"]] for m in metrics if "loss" in m and "step" in m]
    assert plotted["validation loss"] == [[m["step"], m["val_loss"]] for m in metrics if "val_loss" in m] != []
    assert f"lmforge eval instructions --model {run_dir / 'sft' / 'model'} --base {run_dir / 'model'}" in report


def test_pipeline_runs_reward_and_dpo_stages_from_the_sft_model(pipe):
    run_dir, proc = pipe
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["reward"]["model"] == str(run_dir / "reward" / "model")
    assert {"all", "correctness", "tone", "evasive"} <= set(summary["reward"]["test"])
    assert {"all", "correctness", "tone", "evasive"} <= set(summary["dpo"]["test"])
    assert set(summary["dpo"]["tone"]) == {"sft", "dpo"}
    dpo_config = json.loads((run_dir / "dpo" / "results.json").read_text())
    assert dpo_config["model"] == str(run_dir / "sft" / "model") and dpo_config["reference"] == "copy"
    report = (run_dir / "report.md").read_text()
    assert "## Reward model" in report and "## DPO" in report and "| kind | held-out accuracy | pairs |" in report
    # the report's numbers come back from the commands it names
    tone = report[report.index("lmforge eval tone --model " + str(run_dir / "dpo" / "model")):].splitlines()
    printed = next(line for line in tone if line.startswith("prints `"))[len("prints `"):-2]
    again = run_cli("eval", "tone", "--model", str(run_dir / "dpo" / "model"), "--n", "1")
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == printed
    again = run_cli("eval", "reward", "--model", str(run_dir / "reward" / "model"))
    assert again.returncode == 0
    assert f"{'all':<12} accuracy {summary['reward']['test']['all']['accuracy']:.3f}" in again.stdout


def test_pipeline_talks_before_the_first_step_and_names_what_it_wrote(pipe):
    run_dir, proc = pipe
    err = proc.stderr
    banners = re.findall(r"^== stage (\d+)/10: ([a-z +-]+) — ", err, flags=re.M)
    assert banners == [("1", "data + tokenizer"), ("2", "pretrain"), ("3", "eval"), ("4", "samples"),
                       ("5", "in-context"), ("6", "finetune"), ("7", "sft"), ("8", "reward"), ("9", "dpo"),
                       ("10", "rl")]
    before_training = err[:err.index("step 2/10")]
    for said in ("tokenizer: 512 tokens", "shards: ", "model: gpt2"):
        assert said in before_training
    # before pretraining is timed the ETAs say so; after it, the later stages' banners carry estimates
    assert err.count("not measured yet") == 2 and err.count("the run's ≈") == 8
    closing = err[err.index("pipeline done in"):]
    assert f"report {run_dir / 'report.md'}" in closing and f"fine-tuned model: {run_dir / 'finetune' / 'model'}" \
        in closing and "32-token windows, stride 16" in closing and f"SFT model: {run_dir / 'sft' / 'model'}" in closing


def test_pipeline_reports_an_incontext_table(pipe):
    run_dir, _ = pipe
    data = json.loads((run_dir / "incontext.json").read_text())
    assert list(data["results"]) == ["world-kind", "world-arithmetic"] and data["shots"] == [0, 1, 4]
    assert data["max_length"] == 32 and data["results"]["world-kind"]["4"]["n"] == 4
    report = (run_dir / "report.md").read_text()
    assert "| task | metric | chance | majority | k=0 | k=1 | k=4 |" in report and "| world-kind | acc | 0.200 |" in report


def test_every_link_of_the_report_resolves(pipe):
    run_dir, _ = pipe
    assert (run_dir / "finetune" / "report.md").resolve() in assert_links_resolve(run_dir / "report.md")


@pytest.mark.parametrize("sub, right", [("", "validation perplexity"), ("finetune", "val_accuracy")])
def test_the_curves_plot_every_logged_point(pipe, sub, right):
    run_dir = pipe[0] / sub
    assert_curves_hold_every_point(run_dir, right)
    plotted = json.loads((run_dir / "curves.json").read_text())
    if sub:  # fine-tuning plots its task metric, beside the baselines' test scores
        assert set(plotted["references"]) == {"baseline: majority (test)", "baseline: bag of words (test)"}
    else:
        summary = json.loads((run_dir / "pipeline_summary.json").read_text())
        assert plotted["references"] == {"unigram baseline": summary["unigram_perplexity"]}


def test_the_reports_reproduce_command_prints_the_reports_perplexity(pipe):
    assert_perplexity_reproduces(pipe[0], window=32, stride=16)


def test_the_reports_eval_instructions_command_prints_the_reports_line(pipe):
    run_dir, _ = pipe
    section = (run_dir / "report.md").read_text()
    section = section[section.index("## Reproducing the numbers"):]
    cmd, printed = re.search(r"```sh\n(lmforge eval instructions [^\n]+)\n```\nprints `([^`]+)`", section).groups()
    assert printed.startswith("| test_entities | in_context | 8 |")
    proc = cli(*shlex.split(cmd)[1:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert printed in proc.stdout.splitlines()
