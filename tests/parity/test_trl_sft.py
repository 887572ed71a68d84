"""TRL conformance: on identical tokenised conversations, lmforge's SFT loss equals ``SFTTrainer``'s — assistant-only
loss (``assistant_masks``) and completion-only loss (``completion_mask``), padded batches."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from lmforge.core.tokenizer import Tokenizer  # noqa: E402
from lmforge.data.chat_data import Conversation  # noqa: E402
from lmforge.models.io import load_model  # noqa: E402
from lmforge.objectives.sft import SFTObjective  # noqa: E402
from lmforge.models.io import save_model  # noqa: E402
from lmforge.recipes.sft import ChatConfig, chat_format  # noqa: E402
from tests.sft_models import tiny_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _conversations() -> list[Conversation]:
    convs = []
    for i in range(8):
        msgs = [{"role": "user", "content": f"What is {i} plus one?"},
                {"role": "assistant", "content": f"It is {i + 1}."}]
        if i % 2:
            msgs += [{"role": "user", "content": "And one more?"}, {"role": "assistant", "content": f"{i + 2}."}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "Be brief."}] + msgs
        convs.append(Conversation(msgs, [1] * len(msgs), f"t:{i}"))
    return convs


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny gpt2 with ChatML added (mean rows), saved: lmforge's and transformers' copies of the same weights."""
    root = tmp_path_factory.mktemp("trl")
    base = tiny_model_dir(root / "base")
    model, tok = load_model(base)
    chat_format(ChatConfig(), model, tok)  # adds ChatML's tokens, rows and template
    save_model(model, root / "chat", tokenizer=tok)
    return root / "chat"


@pytest.mark.parametrize("mask_column", ["assistant_masks", "completion_mask"])
def test_sft_loss_equals_trl(chat_model, tmp_path, mask_column):
    model, tok = load_model(chat_model)
    model.eval()
    fmt, _ = chat_format(ChatConfig(), model, Tokenizer.load(chat_model))
    objective = SFTObjective(fmt, max_length=128, pad_id=tok.pad_id)
    examples = [objective.encode(c) for c in _conversations()]
    rows = [{"input_ids": ids, mask_column: mask} for ids, mask in examples]

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(chat_model)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(chat_model))
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_length=None,
                         packing=False, completion_only_loss=mask_column == "completion_mask", report_to="none",
                         use_cpu=True, dataloader_num_workers=0, seed=0, save_strategy="no")
    trainer = trl.SFTTrainer(model=hf_model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=hf_tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(hf_model, dict(batch)))
    # the same rows, in the dataloader's order, through lmforge's objective
    by_ids = {tuple(ids): (ids, mask) for ids, mask in examples}
    order = [by_ids[tuple(r[a.bool()].tolist())] for r, a in zip(batch["input_ids"], batch["attention_mask"])]
    with torch.no_grad():
        ours = objective.loss(model, objective.collate(order))
    assert int(ours.count) == int((batch["labels"][:, 1:] != -100).sum())
    assert float(ours.loss_sum) / int(ours.count) == pytest.approx(trl_loss, rel=1e-5)
    objective.packing = True  # packed: the same loss
    with torch.no_grad():
        packed = objective.loss(model, objective.collate(order))
    assert float(packed.loss_sum) / int(packed.count) == pytest.approx(trl_loss, rel=1e-5)
