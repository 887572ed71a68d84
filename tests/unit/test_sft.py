"""SFT data and objective: formats -> conversations, supervised tokens, truncation, padding vs packing."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.core.errors import DataError
from lmforge.core.tokenizer import Tokenizer
from lmforge.data.chat import CHATML_TEMPLATE, ChatFormat
from lmforge.data.chat_data import Conversation, read_conversations
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.objectives.base import IGNORE_INDEX
from lmforge.objectives.sft import SFTObjective, cut_to_fit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer.train(["Mira lives in Tovel by the river. Her brother lives in Arden. " * 4,
                         "where does who what is a the user assistant system"], vocab_size=300,
                        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                        pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    return t


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


# ---- formats ------------------------------------------------------------------------------------------
def test_formats_read_to_the_same_conversation(tmp_path):
    want = [{"role": "user", "content": "Where does Mira live?"}, {"role": "assistant", "content": "In Tovel."}]
    files = {
        "messages": {"messages": want},
        "sharegpt": {"conversations": [{"from": "human", "value": want[0]["content"]},
                                       {"from": "gpt", "value": want[1]["content"]}]},
        "alpaca": {"instruction": "Where does Mira live?", "input": "", "output": "In Tovel."},
        "prompt_completion": {"prompt": want[0]["content"], "completion": want[1]["content"]},
    }
    for name, rec in files.items():
        (conv,) = read_conversations(str(_write(tmp_path, f"{name}.jsonl", [rec])))
        assert conv.messages == want, name
        assert conv.weights == [1, 1]
        assert conv.where.endswith(f"{name}.jsonl:1")
    (alp,) = read_conversations(str(_write(tmp_path, "a2.jsonl", [{"instruction": "Say", "input": "x",
                                                                       "output": "y", "system": "S"}])))
    assert alp.messages[0] == {"role": "system", "content": "S"} and alp.messages[1]["content"] == "Say\n\nx"


def test_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "Hi", "completion": "Hello."}, {"prompt": "Yo", "completion": "Hey."}])
    ds.save_to_disk(str(tmp_path / "ds"))
    convs = list(read_conversations(str(tmp_path / "ds")))
    assert [c.messages[1]["content"] for c in convs] == ["Hello.", "Hey."]
    assert convs[1].where.endswith("ds:row 1")


@pytest.mark.parametrize("rec, message", [
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "assistant) is empty"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}, "weight is 2"),
    ({"text": "plain"}, "not a conversation record"),
])
def test_bad_records_are_one_line_with_file_and_line(tmp_path, rec, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    p = _write(tmp_path, "bad.jsonl", [good, rec])
    with pytest.raises(DataError) as e:
        list(read_conversations(str(p)))
    assert "bad.jsonl:2: " in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


# ---- supervised tokens ----------------------------------------------------------------------------------
def _conv(*pairs, weights=None):
    msgs = []
    for u, a in pairs:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return Conversation(msgs, weights or [1] * len(msgs), "t.jsonl:1")


def test_pad_equal_to_eos_is_still_supervised(tok):
    """pad = eos = <|endoftext|>; the reply ends with <|im_end|> and a reply that *says* <|endoftext|> too: every
    such token is a target, since labels come from the mask, never from comparing with the pad id."""
    assert tok.pad_id == tok.eos_id
    obj = SFTObjective(ChatFormat(tok), max_length=128, pad_id=tok.pad_id)
    ex = obj.encode(_conv(("Where?", "In Tovel.<|endoftext|>")))
    batch = obj.collate([ex, obj.encode(_conv(("Who?", "Mira.")))])
    targets = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert targets.count(tok.pad_id) == 1 and targets[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(targets) == "In Tovel.<|endoftext|><|im_end|>"
    # the second row's pads are pad = eos ids in the inputs, never targets
    assert batch["input_ids"][1, -1] == tok.pad_id and batch["labels"][1, -1] == IGNORE_INDEX


def test_weight_zero_turn_is_not_supervised(tok):
    obj = SFTObjective(ChatFormat(tok), max_length=128, pad_id=0)
    ids, mask = obj.encode(_conv(("Where?", "In Tovel."), ("Who?", "Mira."), weights=[1, 0, 1, 1]))
    text = tok.decode([t for t, m in zip(ids, mask) if m])
    assert text == "Mira.<|im_end|>"


def test_truncation_cuts_after_a_whole_turn_and_counts(tok):
    obj = SFTObjective(ChatFormat(tok), max_length=10_000, pad_id=0)
    long = _conv(("Where?", "In Tovel."), ("Who lives in Arden by the river?", "Her brother lives in Arden." * 3))
    ids, mask = obj.encode(long)
    first_end = next(t for t in range(1, len(mask)) if mask[t - 1] and not mask[t])
    small = SFTObjective(ChatFormat(tok), max_length=len(ids) - 3, pad_id=0)
    cut = small.encode(long)
    assert cut == (ids[:first_end], mask[:first_end]) and small.truncated == 1 and small.dropped == 0
    tiny = SFTObjective(ChatFormat(tok), max_length=first_end - 1, pad_id=0)
    assert tiny.encode(long) is None and tiny.dropped == 1
    assert cut_to_fit([1, 2, 3], [0, 1, 1], 5) == ([1, 2, 3], [0, 1, 1])


# ---- packing ----------------------------------------------------------------------------------------------
def _model(family: str, vocab: int) -> DecoderLM:
    torch.manual_seed(0)
    kw = dict(n_kv_head=2) if family == "llama" else {}
    return DecoderLM(DecoderConfig(family=family, vocab_size=vocab, d_model=64, n_layer=2, n_head=4,
                                   max_seq_len=128, **kw)).eval()


def _examples(tok):
    obj = SFTObjective(ChatFormat(tok), max_length=96, pad_id=tok.pad_id)
    convs = [_conv(("Where does Mira live?", "In Tovel.")), _conv(("Who?", "Her brother."), ("Where?", "Arden.")),
             _conv(("What is by the river?", "Tovel is.")), _conv(("Hi", "Mira lives in Tovel by the river."))]
    return obj, [obj.encode(c) for c in convs]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_logits_equal_each_conversation_alone(tok, family):
    obj, examples = _examples(tok)
    model = _model(family, tok.vocab_size)
    obj.packing = True
    batch = obj.collate(examples)
    assert batch["input_ids"].shape[0] < len(examples)  # really packed
    assert int(batch["position_ids"].max()) < max(len(i) for i, _ in examples)  # positions restarted
    with torch.no_grad():
        packed = model.logits(obj.forward(model, batch))
        for r, row in enumerate(obj.pack(examples)):
            at = 0
            for i in row:
                x = torch.tensor(examples[i][0][:-1])[None]
                alone = model.logits(model(x))[0]
                assert torch.allclose(packed[r, at:at + x.shape[1]], alone, atol=1e-5, rtol=0)
                at += x.shape[1]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_loss_equals_padded_across_accumulation(tok, family):
    obj, examples = _examples(tok)
    model = _model(family, tok.vocab_size)
    padded = obj.collate(examples)
    obj.packing = True
    packed = obj.collate(examples)
    assert obj.target_count(packed) == obj.target_count(padded)
    with torch.no_grad():
        a = obj.loss(model, padded)
        b = obj.loss(model, packed)
        assert int(a.count) == int(b.count)
        assert torch.allclose(a.loss_sum, b.loss_sum, rtol=1e-5)
        # two micro-batches each (halves of the conversations): summed losses over the same global count
        n = obj.target_count(padded)
        obj.packing = False
        pad_micro = sum(obj.loss(model, obj.collate(examples[k:k + 2])).loss_sum for k in (0, 2)) / n
        obj.packing = True
        pack_micro = sum(obj.loss(model, obj.collate(examples[k:k + 2])).loss_sum for k in (0, 2)) / n
        assert torch.allclose(pad_micro, a.loss_sum / n, rtol=1e-5)
        assert torch.allclose(pack_micro, a.loss_sum / n, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trainer_steps_equal_packed_padded_and_accumulated(tok, family, tmp_path):
    """The Trainer's logged losses over 3 steps: one padded batch, packed rows, packed in micro-batches of 2
    conversations — the same global-count normalisation, so the same losses and the same updates."""
    from lmforge.data.examples import ExampleSource
    from lmforge.train import RunSpec, Trainer, TrainerConfig

    obj, examples = _examples(tok)
    runs = {}
    for name, packing, micro in (("padded", False, None), ("packed", True, None), ("packed_micro", True, 2)):
        model = _model(family, tok.vocab_size).train()
        obj.packing = packing
        cfg = TrainerConfig(global_batch_size=4, micro_batch_size=micro, lr=2e-3, warmup_steps=0, schedule="constant",
                            weight_decay=0.1, eval_every=0, ckpt_every=100, log_every=1, device="cpu")
        Trainer(model, obj, ExampleSource(list(examples), obj.collate, seed=0), cfg,
                RunSpec(tmp_path / name, 3, seed=0, resume="false"), progress=False).fit()
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in rows if "loss" in r]
    assert len(runs["padded"]) == 3 and runs["padded"][2] < runs["padded"][0]
    for name in ("packed", "packed_micro"):
        assert runs[name] == pytest.approx(runs["padded"], rel=1e-5), (name, runs)
