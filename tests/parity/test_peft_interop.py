"""LoRA / DoRA adapters move between lmforge and Hugging Face PEFT unchanged, fp32, eval mode:

* lmforge -> PEFT: an lmforge model is saved as a transformers checkpoint, a LoRA/DoRA delta is trained (here:
  set at random) and saved by ``save_delta``; ``PeftModel.from_pretrained`` on the transformers model gives
  the lmforge model's logits (GPT-2 and BERT classifiers with their heads, Llama LM, T5 seq2seq);
* PEFT -> lmforge: ``get_peft_model`` + ``save_pretrained`` on a transformers model, ``load_delta`` on the
  lmforge model loaded from the same checkpoint gives PEFT's logits;
* ``lmforge merge`` output loads in plain transformers with the adapted model's logits.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lmforge.delta import DeltaConfig, apply_delta, load_delta, save_delta  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.models.decoder_config import DecoderConfig  # noqa: E402
from lmforge.models.encdec import EncoderDecoderLM  # noqa: E402
from lmforge.models.t5_layers import T5Config  # noqa: E402
from lmforge.models.encoder import EncoderLM  # noqa: E402
from lmforge.models.encoder_config import EncoderConfig  # noqa: E402
from lmforge.models.io import load_model, save_model  # noqa: E402
from lmforge.models.task import SequenceClassifier  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, PAD, EOS = 96, 0, 2
TOL = dict(rtol=1e-5, atol=1e-5)
KINDS = ["gpt2_cls", "bert_cls", "llama_lm", "t5"]


def _lmforge(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "t5":
        return EncoderDecoderLM(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                         dropout=0.0, pad_token_id=PAD, eos_token_id=1))
    if kind == "bert_cls":
        return SequenceClassifier(EncoderLM(EncoderConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_ff=48,
                                                          max_seq_len=32, dropout=0.0, attention_dropout=0.0,
                                                          pad_token_id=PAD)), ["a", "b", "c"])
    fam = "gpt2" if kind.startswith("gpt2") else "llama"
    extra = dict(n_kv_head=2, tie_embeddings=False) if fam == "llama" else {}
    dec = DecoderLM(DecoderConfig(family=fam, vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_ff=48,
                                  max_seq_len=32, eos_token_id=EOS, pad_token_id=PAD, **extra))
    return SequenceClassifier(dec, ["a", "b", "c"]) if kind.endswith("_cls") else dec


def _perturb(model: torch.nn.Module, only_trainable: bool = False, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if only_trainable and not p.requires_grad:
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 6:] = PAD
    mask[1, 6:] = 0
    ids[0, 9] = EOS
    ids[1, 5] = EOS
    return ids, mask


def _ours(kind: str, model: torch.nn.Module) -> torch.Tensor:
    ids, mask = _batch()
    with torch.no_grad():
        if kind == "t5":
            return model.logits(model(ids, attention_mask=mask, decoder_input_ids=ids[:, :4]))
        if kind == "llama_lm":
            return model.logits(model(ids, attention_mask=mask))[mask.bool()]
        return model(ids, attention_mask=mask)


def _theirs(kind: str, hf: torch.nn.Module) -> torch.Tensor:
    ids, mask = _batch()
    with torch.no_grad():
        if kind == "t5":
            return hf(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4]).logits
        out = hf(input_ids=ids, attention_mask=mask).logits
        return out[mask.bool()] if kind == "llama_lm" else out


def _hf_base(kind: str, path):
    auto = (transformers.AutoModelForSeq2SeqLM if kind == "t5" else transformers.AutoModelForCausalLM
            if kind.endswith("_lm") else transformers.AutoModelForSequenceClassification)
    return auto.from_pretrained(path, attn_implementation="eager").eval()


def _base_dir(kind: str, tmp_path):
    model = _lmforge(kind).eval()
    _perturb(model)
    save_model(model, tmp_path / "base")
    return tmp_path / "base"


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", KINDS)
def test_lmforge_adapter_loads_in_peft(kind, dora, tmp_path):
    base = _base_dir(kind, tmp_path)
    model, _ = load_model(base)
    cfg = DeltaConfig(method="dora" if dora else "lora", r=4, alpha=8)
    apply_delta(model, cfg)
    _perturb(model, only_trainable=True, seed=2)  # a "trained" delta and head
    save_delta(model, tmp_path / "adapter", cfg)
    ours = _ours(kind, model.eval())
    hf = peft.PeftModel.from_pretrained(_hf_base(kind, base), tmp_path / "adapter").eval()
    theirs = _theirs(kind, hf)
    plain = _theirs(kind, _hf_base(kind, base))
    assert not torch.allclose(theirs, plain, atol=1e-3)  # the adapter (and head) changed the model
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_in_lmforge(kind, tmp_path):
    base = _base_dir(kind, tmp_path)
    hf = _hf_base(kind, base)
    task = {"t5": "SEQ_2_SEQ_LM", "llama_lm": "CAUSAL_LM"}.get(kind, "SEQ_CLS")
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type=task, r=4, lora_alpha=8, use_rslora=kind == "t5"))
    _perturb(pm, only_trainable=True, seed=3)
    pm.save_pretrained(tmp_path / "peft")
    theirs = _theirs(kind, pm.eval())
    model, _ = load_model(base)
    cfg = load_delta(model, tmp_path / "peft")
    assert cfg.rslora == (kind == "t5")
    torch.testing.assert_close(_ours(kind, model.eval()), theirs, **TOL)


def test_merge_command_gives_a_plain_transformers_model(tmp_path):
    from lmforge.apps.cli import main

    base = _base_dir("gpt2_cls", tmp_path)
    model, _ = load_model(base)
    cfg = DeltaConfig(method="dora", r=4, alpha=8)
    apply_delta(model, cfg)
    _perturb(model, only_trainable=True, seed=2)
    save_delta(model, tmp_path / "adapter", cfg)
    want = _ours("gpt2_cls", model.eval())
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_theirs("gpt2_cls", merged), want, **TOL)
    other = _lmforge("gpt2_cls").eval()  # same architecture, other weights: refused by fingerprint
    _perturb(other, seed=7)
    save_model(other, tmp_path / "other")
    from tests.conftest import run_cli

    proc = run_cli("merge", "--base", str(tmp_path / "other"), "--adapter", str(tmp_path / "adapter"), "--out",
                   str(tmp_path / "m2"))
    assert proc.returncode == 2 and "different base model" in proc.stderr and "Traceback" not in proc.stderr
