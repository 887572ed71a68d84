"""Prompt and prefix tuning move between lmforge and Hugging Face PEFT unchanged (fp32, eval mode), and both
work through lmforge's own decoding caches.

* transformers' GPT-2 classifier fed ``inputs_embeds`` (as PEFT feeds it for prompt tuning) reads the last
  position whatever the padding, so the GPT-2 classifier rows here are unpadded; BERT pools the first prompt
  vector in both;
* PEFT's prefix tuning runs on transformers' causal LMs and T5 only (its classifiers take no past key values in
  transformers 5), so a GPT-2 classifier's prefix is checked by an lmforge round trip through the same PEFT-format
  files; PEFT's T5 prefixes load with PEFT's own layer assignment; lmforge's T5 prefixes (one per layer, which
  PEFT cannot express) and BERT prefixes (positions kept, where transformers' BERT shifts them) round-trip
  through lmforge's format.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lmforge.delta import DeltaConfig, apply_delta, load_delta, save_delta  # noqa: E402
from lmforge.eval.generate import GenerationConfig, generate  # noqa: E402
from lmforge.eval.generate_seq2seq import generate_seq2seq  # noqa: E402
from lmforge.models.io import load_model  # noqa: E402
from tests.parity.test_peft_interop import KINDS, PAD, TOL, VOCAB, _base_dir, _hf_base, _lmforge, _perturb  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
N = 4
PREFIX_KINDS = ["gpt2_lm", "llama_lm"]  # lmforge -> PEFT: what PEFT can run with one prefix per layer


def _task(kind):
    return "SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM" if kind.endswith("_lm") else "SEQ_CLS"


def _batch(kind: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    if kind != "gpt2_cls":
        ids[1, 6:], mask[1, 6:] = PAD, 0
    return ids, mask


def _ours(kind, model):
    ids, mask = _batch(kind)
    with torch.no_grad():
        if kind == "t5":
            return model.logits(model(ids, attention_mask=mask, decoder_input_ids=ids[:, :4]))
        if kind.endswith("_lm"):
            return model.logits(model(ids, attention_mask=mask))[mask.bool()]
        return model(ids, attention_mask=mask)


def _theirs(kind, hf, extra_positions=0):
    ids, mask = _batch(kind)
    with torch.no_grad():
        if kind == "t5":
            return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4]).logits
        out = hf(input_ids=ids, attention_mask=mask).logits
        if kind.endswith("_lm"):  # PEFT's prompt tuning returns the prompt positions' logits too
            return out[:, extra_positions:][mask.bool()]
        return out


def _trained(kind, tmp_path, method, **kw):
    base = _base_dir(kind, tmp_path)
    model, _ = load_model(base)
    cfg = DeltaConfig(method=method, num_virtual_tokens=N, **kw)
    apply_delta(model, cfg)
    _perturb(model, only_trainable=True, seed=2)  # a "trained" prompt/prefix and head
    save_delta(model, tmp_path / "adapter", cfg)
    return base, model.eval()


@pytest.mark.parametrize("method, kind", [("prompt", k) for k in KINDS] + [("prefix", k) for k in PREFIX_KINDS])
def test_lmforge_delta_loads_in_peft(method, kind, tmp_path):
    base, model = _trained(kind, tmp_path, method)
    pc = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert pc["peft_type"] == f"{method.upper()}_TUNING" and pc["task_type"] == _task(kind)
    ours = _ours(kind, model)
    hf = peft.PeftModel.from_pretrained(_hf_base(kind, base), tmp_path / "adapter").eval()
    theirs = _theirs(kind, hf, N if method == "prompt" else 0)
    plain = _theirs(kind, _hf_base(kind, base))
    assert not torch.allclose(theirs, plain, atol=1e-3)  # the prompt/prefix (and head) changed the model
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("method, kind", [("prompt", k) for k in KINDS] + [("prefix", k) for k in PREFIX_KINDS + ["t5"]])
def test_peft_delta_loads_in_lmforge(method, kind, tmp_path):
    base = _base_dir(kind, tmp_path)
    hf = _hf_base(kind, base)
    if method == "prompt":
        pc = peft.PromptTuningConfig(task_type=_task(kind), num_virtual_tokens=N,
                                     **({"num_transformer_submodules": 1} if kind == "t5" else {}))
    else:
        pc = peft.PrefixTuningConfig(task_type=_task(kind), num_virtual_tokens=N)
    pm = peft.get_peft_model(hf, pc)
    _perturb(pm, only_trainable=True, seed=3)
    pm.save_pretrained(tmp_path / "peft")
    theirs = _theirs(kind, pm.eval(), N if method == "prompt" else 0)
    model, _ = load_model(base)
    cfg = load_delta(model, tmp_path / "peft")
    assert cfg.methods == [method] and cfg.num_virtual_tokens == N
    torch.testing.assert_close(_ours(kind, model.eval()), theirs, **TOL)


@pytest.mark.parametrize("kind", ["gpt2_cls", "bert_cls", "t5"])
def test_prefix_round_trips_through_its_files(kind, tmp_path):
    base, model = _trained(kind, tmp_path, "prefix", prefix_projection=True, encoder_hidden_size=16)
    want = _ours(kind, model)
    if kind != "gpt2_cls":  # t5 and bert prefixes: lmforge's format (see peft_format._peft_type)
        assert json.loads((tmp_path / "adapter" / "delta_config.json").read_text())["format"] == "lmforge-delta"
    else:
        pc = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert pc["peft_type"] == "PREFIX_TUNING" and pc["prefix_projection"] is False  # saved folded
    plain, _ = load_model(base)
    assert not torch.allclose(_ours(kind, plain.eval()), want, atol=1e-3)
    again, _ = load_model(base)
    cfg = load_delta(again, tmp_path / "adapter")
    assert cfg.methods == ["prefix"] and cfg.prefix_projection == (kind != "gpt2_cls")  # PEFT files: folded table
    torch.testing.assert_close(_ours(kind, again.eval()), want, **TOL)


def test_prefix_from_activations_equals_prepending_the_tokens():
    """Li & Liang's init: a GPT-2 prefix made of the frozen model's own keys/values for tokens X gives exactly the
    outputs of running X followed by the input (causal layers: X's activations do not depend on what follows)."""
    from lmforge.delta.prefix import _activations

    model = _lmforge("gpt2_lm").eval()
    _perturb(model)
    x = torch.tensor([11, 12, 13, 14])
    table = _activations(model, x)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(torch.cat([x.expand(2, -1), ids], dim=1))[:, N:]
    apply_delta(model, DeltaConfig(method="prefix", num_virtual_tokens=N, prompt_init="random"))
    with torch.no_grad():
        model.prefix.table.copy_(table)
        got = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_peft_t5_prompt_with_decoder_rows_generates_like_peft(tmp_path):
    """PEFT's T5 default keeps 2·n rows (encoder, then decoder); its generate uses the encoder's only, as lmforge."""
    base = _base_dir("t5", tmp_path)
    pm = peft.get_peft_model(_hf_base("t5", base), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N))
    _perturb(pm, only_trainable=True, seed=4)
    pm.save_pretrained(tmp_path / "peft")
    ids, mask = _batch("t5")
    with torch.no_grad():
        theirs = pm.eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    decoder_start_token_id=PAD, eos_token_id=1, pad_token_id=PAD)
    model, _ = load_model(base)
    load_delta(model, tmp_path / "peft")
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    ours = generate_seq2seq(model.eval(), rows, GenerationConfig(max_new_tokens=6, temperature=0.0))
    for row, res in zip(theirs.tolist(), ours):
        want = row[1:]  # drop the start token
        got = list(res.tokens)
        assert got and want[:len(got)] == got and all(t == PAD for t in want[len(got):])


@pytest.mark.parametrize("kind, method", [(k, m) for k in ("gpt2_lm", "llama_lm", "t5") for m in ("prompt", "prefix")]
                         + [("gpt2_lm", "ladder"), ("llama_lm", "ladder")])
def test_decoding_with_a_cache_matches_the_full_forward(kind, method):
    """Greedy decoding through the cache (prompt/prefix cached once, a ladder's side network with its own cache,
    left padding, explicit positions) picks the same tokens as re-running the whole sequence without a cache."""
    model = _lmforge(kind).eval()
    apply_delta(model, DeltaConfig(method=method, num_virtual_tokens=N))
    _perturb(model, only_trainable=True, seed=5)
    prompts = [[5, 9, 17, 33, 40, 41], [7, 8]]
    cfg = GenerationConfig(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    if kind == "t5":
        res = generate_seq2seq(model, prompts, cfg)
    else:
        res = generate(model, prompts, cfg)
    for p, r in zip(prompts, res):
        seq = [model.config.start_token_id] if kind == "t5" else list(p)
        start = len(seq)
        with torch.no_grad():
            for _ in range(5):
                x = torch.tensor([seq])
                h = model(torch.tensor([p]), decoder_input_ids=x) if kind == "t5" else model(x)
                seq.append(int(model.logits(h)[0, -1].argmax()))
        assert list(r.tokens) == seq[start:]
