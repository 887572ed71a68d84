"""Task files, their errors, and the fine-tuning objectives' encode/collate/loss."""

import json

import pytest
import torch

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.tokenizer import Tokenizer
from lmforge.data.examples import ExampleSource
from lmforge.data.tasks import TaskConfig, load_task
from lmforge.objectives.base import IGNORE_INDEX
from lmforge.objectives.classification import ClassificationObjective
from lmforge.objectives.completion import CompletionObjective
from lmforge.objectives.text_to_text import TextToTextObjective
from lmforge.objectives.token_classification import TokenClassificationObjective

TEXTS = ["the food was not bad at all", "the inn was dirty, but the view was lovely", "Alva Dorn lives in Tovin",
         "question: where does Alva live? answer: Tovin"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def bert_tok():
    return Tokenizer.train(TEXTS, vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _cls_rows(n=20):
    return [{"text": f"review number {i} was {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i in range(n)]


def test_user_jsonl_classification_with_split(tmp_path):
    cfg = TaskConfig(name=None, train=_jsonl(tmp_path / "t.jsonl", _cls_rows()))
    task = load_task(cfg)
    assert task.type == "classification" and task.labels == ["neg", "pos"]
    assert task.sizes() == {"train": 18, "validation": 2, "test": 0}
    again = load_task(cfg)
    assert [r["text"] for r in again.splits["validation"]] == [r["text"] for r in task.splits["validation"]]
    other = load_task(TaskConfig(name=None, train=cfg.train, split_seed=1))
    assert [r["text"] for r in other.splits["validation"]] != [r["text"] for r in task.splits["validation"]]


def test_csv_and_parquet_and_custom_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t.csv").write_text("sentence,y\nhello there,a\ngood bye,b\nso so,a\n", encoding="utf-8")
    cfg = TaskConfig(name=None, train=str(tmp_path / "t.csv"), validation=str(tmp_path / "t.csv"),
                     text_field="sentence", label_field="y")
    task = load_task(cfg)
    assert task.sizes()["train"] == 3 and task.splits["train"][1]["label"] == "b"
    pq.write_table(pa.table({"input": ["q1", "q2", "q3"], "target": ["a1", "a2", "a3"]}), tmp_path / "t.parquet")
    task = load_task(TaskConfig(name=None, train=str(tmp_path / "t.parquet"), validation=str(tmp_path / "t.parquet")))
    assert task.type == "text2text" and task.splits["validation"][2] == {"input": "q3", "target": "a3",
                                                                         "where": f"{tmp_path / 't.parquet'}:row 2"}


@pytest.mark.parametrize("row, message", [
    ({"txt": "hello", "label": "a"}, "no field 'text' (fields present: txt, label); add it or set task.text_field"),
    ({"text": "   ", "label": "a"}, "field 'text' is empty"),
    ({"text": "hi", "label": ""}, "label field 'label' is empty"),
])
def test_record_errors_name_file_and_line(tmp_path, row, message):
    rows = _cls_rows(4) + [row]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_task(TaskConfig(name=None, train=path, validation=path))
    assert "bad.jsonl:5: " in str(e.value) and message in str(e.value)


def test_label_outside_label_set(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", _cls_rows(6))
    val = _jsonl(tmp_path / "val.jsonl", [{"text": "x y", "label": "neutral"}])
    with pytest.raises(DataError, match=r"val.jsonl:1: label 'neutral' is not in the label set \['neg', 'pos'\]"):
        load_task(TaskConfig(name=None, train=train, validation=val))
    with pytest.raises(DataError, match="from task.labels"):
        load_task(TaskConfig(name=None, train=train, validation=train, labels=["neg", "other"]))


def test_token_rows_checked(tmp_path):
    path = _jsonl(tmp_path / "ner.jsonl", [{"tokens": ["Alva", "Dorn", "sings"], "tags": ["B-PER", "I-PER", "O"]},
                                           {"tokens": "Tovin is big", "tags": "B-LOC O O"},
                                           {"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match="ner.jsonl:3: 2 tokens but 1 tags"):
        load_task(TaskConfig(name=None, train=path, validation=path))


def test_name_and_files_conflict_and_missing_task(tmp_path):
    with pytest.raises(ConfigError, match="both set"):
        load_task(TaskConfig(name="world-sentiment", train="x.jsonl"))
    with pytest.raises(ConfigError, match="no task"):
        load_task(TaskConfig(name=None))
    with pytest.raises(DataError, match="does not exist"):
        load_task(TaskConfig(name=None, train=str(tmp_path / "nope.jsonl")))


# ---- objectives -----------------------------------------------------------------------------------
def test_completion_masks_prompt_and_ends_with_eos(tok):
    obj = CompletionObjective(tok, max_length=64, max_target_length=8)
    p, c = obj.encode({"input": "where does Alva live?", "target": "Tovin"})
    assert c[-1] == tok.eos_id and tok.decode(c[:-1]) == " Tovin"
    assert tok.decode(p).endswith("\nAnswer:")
    batch = obj.collate([(p, c), obj.encode({"input": "the inn", "target": "lovely view"})])
    row = batch["labels"][0]
    targets = row[row != IGNORE_INDEX].tolist()
    assert targets == c  # exactly the completion (incl. EOS) is scored
    assert obj.target_count(batch) == len(c) + len(obj.encode({"input": "the inn", "target": "lovely view"})[1])


def test_completion_truncates_input_not_template(tok):
    obj = CompletionObjective(tok, max_length=16, max_target_length=8)
    p, c = obj.encode({"input": " ".join(TEXTS[:4]), "target": "Tovin"})
    assert len(p) + len(c) - 1 <= 16 and obj.truncated == 1
    assert tok.decode(p).endswith("\nAnswer:")


def test_classification_encoding_bert_pairs_and_truncation(bert_tok):
    obj = ClassificationObjective(bert_tok, "bert", {"a": 0, "b": 1}, max_length=12)
    ex = obj.encode({"text": "the food was", "text_pair": "not bad", "label": "b"})
    ids, types = ex["input_ids"], ex["token_type_ids"]
    assert ids[0] == bert_tok.cls_id and ids[-1] == bert_tok.sep_id and ids.count(bert_tok.sep_id) == 2
    assert types[0] == 0 and types[-1] == 1 and ex["label"] == 1
    long = obj.encode({"text": " ".join(TEXTS[:3]), "label": "a"})
    assert len(long["input_ids"]) == 12 and obj.truncated == 1


def test_classification_decoder_appends_eos_and_aux_labels(tok):
    obj = ClassificationObjective(tok, "gpt2", {"a": 0, "b": 1}, max_length=32, aux_lm_weight=0.5, append_eos=True)
    batch = obj.collate([obj.encode({"text": "the inn was dirty", "label": "a"}),
                         obj.encode({"text": "lovely", "label": "b"})])
    assert batch["input_ids"][1, batch["attention_mask"][1].sum() - 1] == tok.eos_id
    # lm_labels[t] = input[t+1]; nothing predicted after the last real token
    n = int(batch["attention_mask"][0].sum())
    assert batch["lm_labels"][0, :n - 1].tolist() == batch["input_ids"][0, 1:n].tolist()
    assert (batch["lm_labels"][0, n - 1:] == IGNORE_INDEX).all()
    with pytest.raises(ConfigError, match="aux_lm_weight"):
        ClassificationObjective(tok, "bert", {"a": 0}, 8, aux_lm_weight=0.5)


def test_classification_decoder_without_eos_reads_the_texts_last_token(tok):
    obj = ClassificationObjective(tok, "gpt2", {"a": 0, "b": 1}, max_length=32, append_eos=False)
    rec = obj.encode({"text": "the inn was dirty", "label": "a"})
    assert rec["input_ids"] == tok.encode("the inn was dirty", add_special_tokens=False)
    short = ClassificationObjective(tok, "gpt2", {"a": 0}, max_length=3, append_eos=False)
    assert len(short.encode({"text": "the inn was very dirty", "label": "a"})["input_ids"]) == 3  # no EOS slot


def test_token_classification_first_subtoken_labels(bert_tok):
    obj = TokenClassificationObjective(bert_tok, {"O": 0, "B-PER": 1, "I-PER": 2}, max_length=64)
    ex = obj.encode({"tokens": ["Alva", "Dorn", "lives", "in", "Tovin."], "tags": ["B-PER", "I-PER", "O", "O", "O"]})
    labelled = [l for l in ex["labels"] if l != IGNORE_INDEX]
    assert labelled == [1, 2, 0, 0, 0] and ex["n_words"] == 5
    assert ex["input_ids"][0] == bert_tok.cls_id and ex["input_ids"][-1] == bert_tok.sep_id
    short = TokenClassificationObjective(bert_tok, {"O": 0, "B-PER": 1, "I-PER": 2}, max_length=5)
    ex = short.encode({"tokens": ["Alva", "Dorn", "lives", "in", "Tovin."], "tags": ["B-PER", "I-PER", "O", "O", "O"]})
    assert len(ex["input_ids"]) <= 5 and short.truncated == 1 and ex["n_words"] < 5


def test_text2text_appends_eos(tok):
    obj = TextToTextObjective(tok, max_length=8, max_target_length=4)
    x, y = obj.encode({"input": "question: where does Alva live?", "target": "Tovin"})
    assert x[-1] == tok.eos_id and y[-1] == tok.eos_id and len(x) <= 8 and obj.truncated == 1


def test_text2text_target_copies_the_input_tokens(tok):
    # the answer is encoded as the word it is inside the input (" Tovin", not "Tovin"), so a model that copies
    # from its input copies the same ids; without this, held-out names could never be copied
    obj = TextToTextObjective(tok, max_length=64, max_target_length=16)
    x, y = obj.encode({"input": "Alva Dorn lives in Tovin", "target": "Tovin"})
    body = y[:-1]
    assert any(x[i:i + len(body)] == body for i in range(len(x))), (x, y)
    comp = CompletionObjective(tok, max_length=64, max_target_length=16)
    _p, c = comp.encode({"input": "where does Alva live? Alva Dorn lives in Tovin", "target": "Tovin"})
    assert c[:-1] == body


def test_example_source_resumes_exactly():
    collate = lambda xs: {"x": torch.tensor(xs)}  # noqa: E731
    a = ExampleSource(list(range(10)), collate, seed=3)
    seen = [a.next_batch(4)["x"].tolist() for _ in range(3)]  # crosses an epoch boundary
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))
    b = ExampleSource(list(range(10)), collate, seed=3)
    b.next_batch(4)
    state = b.state_dict()
    c = ExampleSource(list(range(10)), collate, seed=3)
    c.load_state_dict(state)
    assert [c.next_batch(4)["x"].tolist() for _ in range(2)] == seen[1:]
