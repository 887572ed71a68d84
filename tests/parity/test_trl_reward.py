"""Reward models (issue 28): the score at the last real token, equal to transformers' ``…ForSequenceClassification``
(num_labels = 1) for right- and left-padded batches and when pad = EOS; the pairwise loss and metrics equal TRL's
``RewardTrainer`` on identical batches, with and without a margin and reward centring; K-way rankings."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.core.errors import DataError
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.models.hf_task import load_task_model, save_task_model
from lmforge.models.task import SequenceClassifier
from lmforge.data.preference_data import ranking_pairs
from lmforge.objectives.reward import PairwiseRewardObjective, collate_reward_pairs

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
V, PAD, BOS, EOS = 90, 0, 1, 2


def reward_model(flavour: str, pad: int = PAD) -> SequenceClassifier:
    torch.manual_seed(0)
    extra = {"family": "gpt2"} if flavour == "gpt2" else {"family": "llama", "n_kv_head": 2, "tie_embeddings": False}
    backbone = DecoderLM(DecoderConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4, max_seq_len=48, dropout=0.0,
                                       bos_token_id=BOS, eos_token_id=EOS, pad_token_id=pad, **extra))
    model = SequenceClassifier(backbone, ["reward"], scalar=True).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    return model


def rows(n: int, seed: int, end_eos: bool = True) -> list[list[int]]:
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(3, V) for _ in range(rng.randint(2, 9))] + ([EOS] if end_eos else [])
            for _ in range(n)]


def padded(seqs: list[list[int]], side: str, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    return ids, mask


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
# pad = EOS with left padding is no case transformers defines (its rule reads right padding), so it is not tested
@pytest.mark.parametrize("side,pad_is_eos", [("right", False), ("left", False), ("right", True)])
def test_score_is_read_where_transformers_reads_it(tmp_path, flavour, side, pad_is_eos):
    """pad != EOS: the last real token, the final EOS included; pad = EOS: transformers' rule (the rightmost token
    that is not the pad id, so a final EOS is skipped) -- either way the exported model scores the same."""
    pad = EOS if pad_is_eos else PAD
    model = reward_model(flavour, pad)
    save_task_model(model, tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.num_labels == 1 and hf.config.problem_type == "regression"
    seqs = rows(5, seed=1)
    ids, mask = padded(seqs, side, pad)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)[:, 0]
        # positions from the mask, as lmforge takes them (transformers counts left padding unless told)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 0]
        alone = torch.stack([model(torch.tensor([s]))[0, 0] for s in seqs])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    if not pad_is_eos:  # padding never moves the score
        torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)
    else:  # the final EOS is skipped: the score is the one at the token before it
        before = torch.stack([model(torch.tensor([s[:-1]]))[0, 0] for s in seqs])
        torch.testing.assert_close(ours, before, atol=1e-5, rtol=1e-5)
    loaded, _ = load_task_model(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask)[:, 0], ours, atol=1e-6, rtol=1e-6)


def trl_reward(hf, examples, tmp_path, **kwargs) -> tuple[float, dict[str, float]]:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer(), pad_token="<pad>", eos_token="</s>")
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, **kwargs)
    ds = Dataset.from_dict({"chosen": ["a b"], "rejected": ["b a"]})
    trainer = RewardTrainer(model=hf, args=args, train_dataset=ds, processing_class=tok)
    inputs = DataCollatorForPreference(pad_token_id=PAD)(examples)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "<unk>": 5}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return t


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (False, 0.01), (True, 0.05)])
def test_pairwise_loss_and_metrics_equal_trl(tmp_path, margin, center):
    model = reward_model("gpt2")
    save_task_model(model, tmp_path / "rm")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    chosen, rejected = rows(6, seed=2), rows(6, seed=3)
    rng = random.Random(4)
    examples = [{"chosen_ids": c, "rejected_ids": r, **({"margin": rng.uniform(0, 1)} if margin else {})}
                for c, r in zip(chosen, rejected)]
    ref_loss, ref_metrics = trl_reward(hf, examples, tmp_path, center_rewards_coefficient=center)
    objective = PairwiseRewardObjective(pad_id=PAD, center_rewards_coefficient=center)
    with torch.no_grad():
        out = objective.loss(model, collate_reward_pairs(examples, PAD))
    n = out.count
    assert float(out.loss_sum) / n == pytest.approx(ref_loss, rel=1e-5)
    for name in ("accuracy", "margin", "mean_reward"):
        assert float(out.metrics[name]) / n == pytest.approx(ref_metrics[name], rel=1e-5, abs=1e-6), name


def test_a_k_way_ranking_is_every_pair_of_a_prompt_weighted_to_count_once():
    pairs = ranking_pairs(["a", "b", "c", "d"], [2, 0, 3, 1], "prefs.jsonl:1")
    assert pairs == [("c", "a"), ("c", "d"), ("c", "b"), ("a", "d"), ("a", "b"), ("d", "b")]
    model = reward_model("gpt2")
    seqs = rows(4, seed=5)
    examples = [{"chosen_ids": seqs[i], "rejected_ids": seqs[j], "weight": 1 / 6}
                for i, j in ranking_pairs(list(range(4)), [2, 0, 3, 1], "x")]
    examples.append({"chosen_ids": seqs[0], "rejected_ids": seqs[1]})  # a plain pair: one more prompt
    objective = PairwiseRewardObjective(pad_id=PAD)
    batch = objective.collate(examples)
    assert objective.target_count(batch) == 2
    with torch.no_grad():
        out = objective.loss(model, batch)
        score = {i: float(model(torch.tensor([s]))[0, 0]) for i, s in enumerate(seqs)}
    expected = sum(-torch.nn.functional.logsigmoid(torch.tensor(score[i] - score[j])) / 6
                   for i, j in ranking_pairs(list(range(4)), [2, 0, 3, 1], "x"))
    expected += -torch.nn.functional.logsigmoid(torch.tensor(score[0] - score[1]))
    assert float(out.loss_sum) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("ranking,match", [([0, 1, 1], "repeated \\[1\\]"), ([0, 2], "missing \\[1\\]"),
                                           ([0], "at least 2")])
def test_bad_rankings_are_one_line(ranking, match):
    responses = ["x"] * max(len(ranking), 1 if ranking == [0] else 3)
    with pytest.raises(DataError, match=match):
        ranking_pairs(responses, ranking, where="prefs.jsonl:7")
