"""`lmforge sft`, `inspect-data`, `generate --chat` and `chat` end to end on a tiny model built here."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from lmforge.core.tokenizer import Tokenizer
from lmforge.data.chat import ChatFormat
from lmforge.models.io import load_model
from tests.conftest import ROOT, cli, run_cli
from tests.sft_models import arithmetic_chats, tiny_model_dir, write_jsonl

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny gpt2 trained 60 packed steps on arithmetic chats with ChatML added."""
    root = tmp_path_factory.mktemp("sft")
    base = tiny_model_dir(root / "base")
    data = write_jsonl(root / "train.jsonl", arithmetic_chats(40))
    run = root / "run"
    proc = run_cli("sft", f"model={base}", f"data.train={data}", f"run_dir={run}", "max_steps=60", "train.lr=3e-3",
                   "train.eval_every=0", "train.log_every=20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


def test_saved_model_renders_and_stops_in_transformers(trained):
    root, result = trained
    model_dir = root / "run" / "model"
    tok = Tokenizer.load(model_dir)
    assert tok.token_to_id("<|im_end|>") in result["added_tokens"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 plus one?"}]
    ours = ChatFormat(tok).prompt_ids(messages)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"] == ours
    gen = json.loads((model_dir / "generation_config.json").read_text())
    eot = tok.token_to_id("<|im_end|>")
    assert gen["eos_token_id"][0] == eot
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    out = hf_model.generate(torch.tensor([ours]), max_new_tokens=20, do_sample=False)[0, len(ours):].tolist()
    assert out[-1] == eot and len(out) < 20, tok.decode(out)  # stopped at the end of its turn, not at the limit
    assert eot not in out[:-1]
    # embeddings grew with mean rows: the model's vocabulary holds the new tokens
    model, _ = load_model(model_dir)
    assert model.config.vocab_size == tok.vocab_size


def test_loss_fell_and_counts_reported(trained):
    root, result = trained
    lines = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert losses[-1] < 0.5 * losses[0]
    assert result["data"]["train"] == {"conversations": 40, "truncated": 0, "dropped": 0}
    assert result["packing"] is True and result["masking"] == "generation"


def test_lora_trains_the_new_token_rows_only(trained, tmp_path):
    root, _ = trained
    run = tmp_path / "lora"
    proc = run_cli("sft", f"model={root / 'base'}", f"data.train={root / 'train.jsonl'}", f"run_dir={run}",
                   "max_steps=5", "peft.method=lora", "train.eval_every=0", "data.packing=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "adapter").is_dir()
    base, base_tok = load_model(root / "base")
    merged, tok = load_model(run / "model")
    old = base.embed_tokens.weight
    new = merged.embed_tokens.weight
    assert torch.equal(new[:old.shape[0]], old)  # frozen rows stay as they were
    mean = old.float().mean(0)
    for t in ("<|im_start|>", "<|im_end|>"):
        assert not torch.allclose(new[tok.token_to_id(t)], mean, atol=1e-6), t  # the new rows trained
    # PEFT: the base resized to the tokenizer + RUN_DIR/adapter (LoRA + trainable_token_indices) = RUN_DIR/model
    peft = pytest.importorskip("peft")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == [tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")]
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(str(root / "base"))
    hf_base.resize_token_embeddings(tok.vocab_size)
    with_adapter = peft.PeftModel.from_pretrained(hf_base, str(run / "adapter")).eval()
    merged_hf = transformers.AutoModelForCausalLM.from_pretrained(str(run / "model")).eval()
    ids = torch.tensor([ChatFormat(tok).encode(arithmetic_chats(1)[0]["messages"]).ids])
    with torch.no_grad():
        assert torch.allclose(with_adapter(ids).logits, merged_hf(ids).logits, atol=1e-5)


def test_inspect_data_marks_supervised_tokens(trained):
    root, _ = trained
    res = cli("inspect-data", f"model={root / 'base'}", f"data.train={root / 'train.jsonl'}", "-n", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["examples"][0]["supervised_text"] == ["It is 1.<|im_end|>"]
    assert "[[It is 1.<|im_end|>]]" in out["examples"][0]["rendered"]
    assert out["counts"]["train"]["conversations"] == 40


def test_conversation_longer_than_max_length_is_counted(trained, tmp_path):
    root, _ = trained
    rows = arithmetic_chats(3)
    rows[1]["messages"] += [{"role": "user", "content": "And then? " * 10},
                            {"role": "assistant", "content": "It is more. " * 10}]
    rows[2]["messages"][1]["content"] = "It is a long one. " * 20
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    res = cli("inspect-data", f"model={root / 'base'}", f"data.train={data}", "--json", "data.max_length=40")
    counts = json.loads(res.stdout.strip().splitlines()[-1])["counts"]["train"]
    assert counts == {"conversations": 3, "truncated": 1, "dropped": 1}


def test_bad_inputs_are_one_line(trained, tmp_path):
    root, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(arithmetic_chats(1)[0]) + "\n" +
                   json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    res = cli("sft", f"model={root / 'base'}", f"data.train={bad}", f"run_dir={tmp_path / 'r'}")
    assert res.returncode != 0 and res.stderr.count("\n") == 1, res.stderr
    assert f"{bad}:2: the conversation has no assistant turn" in res.stderr
    res = cli("sft", f"model={root / 'base'}", f"data.train={root / 'train.jsonl'}", "chat.add_chatml=false",
              f"run_dir={tmp_path / 'r2'}")
    assert res.returncode != 0 and res.stderr.count("\n") == 1 and "chat_template" in res.stderr, res.stderr
    # ChatML's strings as ordinary tokens: they cannot become special, so no ChatML
    plain = tiny_model_dir(tmp_path / "plain", ordinary_tokens=["<|im_start|>", "<|im_end|>"])
    res = cli("sft", f"model={plain}", f"data.train={root / 'train.jsonl'}", f"run_dir={tmp_path / 'r3'}")
    assert res.returncode != 0 and res.stderr.count("\n") == 1, res.stderr
    assert "ordinary token" in res.stderr and "chat_template" in res.stderr
    raising = tmp_path / "strict.jinja"  # a template that refuses system prompts, as some do
    raising.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                       "role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    chats = arithmetic_chats(2)
    chats[1]["messages"].insert(0, {"role": "system", "content": "Be brief."})
    data = write_jsonl(tmp_path / "sys.jsonl", chats)
    res = cli("inspect-data", f"model={root / 'base'}", f"data.train={data}", f"chat.template={raising}")
    assert res.returncode != 0 and res.stderr.count("\n") == 1, res.stderr
    assert f"{data}:2: the chat template raised: no system role" in res.stderr
    res = cli("generate", "--model", str(root / "base"), "--chat", "hi")
    assert res.returncode != 0 and "no chat_template" in res.stderr and res.stderr.count("\n") == 1


def _read_until(fd: int, marker: str, seen: list[str], timeout: float = 120.0) -> str:
    """Read the pty until ``marker`` follows everything read so far; return the new text."""
    start, buf = time.monotonic(), ""
    while marker not in buf:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {''.join(seen) + buf!r}")
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode("utf-8", "replace")
            except OSError:
                break
            buf += chunk
    seen.append(buf)
    return buf


def test_chat_in_a_pseudo_terminal(trained):
    root, _ = trained
    model = str(root / "run" / "model")
    one = cli("generate", "--model", model, "--chat", "What is 4 plus one?", "--json", "--max-new-tokens", "12")
    assert one.returncode == 0, one.stderr
    expected = json.loads(one.stdout.strip().splitlines()[-1])["reply"]
    assert expected.strip()
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "chat", "--model", model, "--max-new-tokens", "12"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=dict(os.environ), close_fds=True)
    os.close(slave)
    seen: list[str] = []
    try:
        _read_until(master, "you> ", seen)
        os.write(master, b"What is 4 plus one?\n")
        reply = _read_until(master, "you> ", seen)
        assert "assistant> " in reply
        said = reply.split("assistant> ", 1)[1].rsplit("you> ", 1)[0].replace("\r", "").strip()
        assert said == expected.strip()  # the streamed reply is the one-turn reply
        os.write(master, b"/history\n")
        assert "(history: 2 messages)" in _read_until(master, "you> ", seen)
        os.write(master, b"/reset\n")
        assert "history cleared" in _read_until(master, "you> ", seen)
        os.write(master, b"/history\n")
        assert "(history: 0 messages)" in _read_until(master, "you> ", seen)
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
