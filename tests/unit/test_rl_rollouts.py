"""Rollouts and rewards (lmforge/rl): log-probs a teacher-forced pass reproduces, one post-EOS mask, the score on the
last real token (EOS-ended, length-cut, padded answers), a reward model read at the last real token, and each bad
input as one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.chat import ChatFormat
from lmforge.eval.generate import generate
from lmforge.models.io import load_model, save_model
from lmforge.models.task import SequenceClassifier, ensure_pad_token
from lmforge.objectives.rl import GRPOObjective, PPOObjective
from lmforge.recipes.rl_run import encode_prompts
from lmforge.recipes.sft import ChatConfig, chat_format
from lmforge.rl.algos import GRPOAlgo, PPOAlgo, policy_scorer
from lmforge.rl.rewards import RewardConfig, Rewards, Rollouts, check_verifier_fields
from lmforge.rl.rollouts import Prompt, RolloutConfig, RolloutSource, last_token_index
from tests.sft_models import tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("rl") / "policy")


def setup(policy_dir: Path, temperature: float = 1.0, mask_truncated: bool = False, G: int = 4):
    model, tok = load_model(policy_dir)
    fmt, _ = chat_format(ChatConfig(), model, tok)
    records = [{"prompt": f"What is {i} plus one?", "answer": str(i + 1), "check": "number"} for i in range(4)]
    prompts, _ = encode_prompts(records, fmt, 100, "test")
    cfg = RolloutConfig(num_generations=G, max_new_tokens=12, temperature=temperature,
                        mask_truncated_completions=mask_truncated)
    rewards = Rewards([RewardConfig(kind="function", function="tests.rl_rewards:digits")])
    obj = GRPOObjective(temperature=temperature, max_completion_length=12)
    algo = GRPOAlgo(obj, policy_scorer(model, temperature, torch.device("cpu")), None, "group")
    # EOS comes early now and then: the stop ids include two frequent tokens of the random model's answers
    probe = generate(model, [p.ids for p in prompts], cfg.generation([]), num_samples=G,
                     generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([t for r in probe for t in r.tokens[2:]]))
    stops = fmt.stop_ids() + counts.argsort(descending=True)[:2].tolist()
    src = RolloutSource(prompts, cfg, rewards, algo, seed=3, rows_per_step=8, updates=1, minibatches=1,
                        stop_ids=stops, pad_id=tok.eos_id, tokenizer=tok)
    src.generate = lambda p, c, *, num_samples, generator: generate(model, p, c, num_samples=num_samples,
                                                                   generator=generator, tokenizer=tok,
                                                                   pad_id=tok.eos_id, grad_mode="no_grad")
    return model, tok, src, stops


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_rollout_logprobs_equal_a_teacher_forced_pass_under_one_post_eos_mask(policy_dir, temperature):
    _, _, src, stops = setup(policy_dir, temperature)
    batch = src.next_batch(8)
    mask = batch["score_mask"]
    assert (batch["old_logps"][mask] - batch["gen_logps"][mask]).abs().max() <= 1e-5
    assert (batch["old_logps"][~mask] == 0).all()
    assert mask.sum(-1).tolist() == batch["lengths"].long().tolist()  # each answer's tokens, nothing more
    last = last_token_index(mask)
    for i in range(mask.shape[0]):
        assert not mask[i, last[i] + 1:].any()  # nothing after the answer's end is scored
        if not batch["truncated"][i]:
            assert int(batch["input_ids"][i, last[i]]) in stops  # an answer that ended ends on its EOS
    assert batch["truncated"].any() and not batch["truncated"].all()  # both kinds are in the batch


def test_mask_truncated_completions_takes_length_cut_answers_out_of_the_loss(policy_dir):
    _, _, src, _ = setup(policy_dir, mask_truncated=True)
    batch = src.next_batch(8)
    assert not batch["score_mask"][batch["truncated"]].any()
    assert batch["score_mask"][~batch["truncated"]].any(-1).all()


def test_the_score_sits_on_the_last_real_token_for_eos_ended_length_cut_and_padded_answers():
    """Pad = EOS (id 2): by id a final EOS cannot be told from padding; the mask can."""
    EOS = 2
    ids = torch.tensor([[7, 8, 9, 4, EOS, EOS, EOS, EOS],   # EOS-ended, then padding (pad = EOS)
                        [7, 8, 4, 5, 6, 4, 5, 6],           # length-cut: fills the row
                        [7, 9, 4, EOS, EOS, EOS, EOS, EOS]])  # short, more padding
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 3:5], mask[1, 2:8], mask[2, 2:4] = True, True, True
    batch = {"input_ids": ids, "attention_mask": mask | (torch.arange(8) < 2), "score_mask": mask,
             "old_logps": torch.randn(3, 8) * mask, "old_values": torch.zeros(3, 8),
             "scores": torch.tensor([1.5, -2.0, 0.25]), "lengths": mask.sum(-1).float(),
             "truncated": torch.tensor([False, True, False]), "gen_logps": torch.zeros(3, 8)}
    batch["ref_logps"] = batch["old_logps"].clone()  # KL 0: the only reward is the score
    algo = PPOAlgo(PPOObjective(), None, None, torch.device("cpu"), kl=0.1, kl_estimator="k1", gamma=1.0, lam=1.0,
                   whiten_rewards=False, eos_ids=[EOS])
    out = algo.finish(batch, 1)
    r = out["token_rewards"]
    assert r.nonzero().tolist() == [[0, 4], [1, 7], [2, 3]]
    assert r[0, 4] == 1.5 and r[1, 7] == -2.0 and r[2, 3] == 0.25
    assert out["stat/val/num_eos_tokens"].mean() == 2  # rows 0 and 2 ended: the mean over rows logs the total
    assert (out["stat/objective/kl"] == 0).all()


def test_a_reward_model_reads_the_last_real_token_never_a_pad(tmp_path, policy_dir):
    backbone, tok = load_model(policy_dir)
    torch.manual_seed(1)
    rm = SequenceClassifier(backbone, ["reward"], scalar=True)
    torch.nn.init.normal_(rm.head.weight)
    ensure_pad_token(rm, tok)
    save_model(rm, tmp_path / "rm", tokenizer=tok)
    rewards = Rewards([RewardConfig(kind="model", model=str(tmp_path / "rm"))], load_model(policy_dir)[1])
    rows = [[5, 6, 7, tok.eos_id], [5, 6], [8, 9, 10, 11, 12]]
    ids = torch.full((3, 5), tok.eos_id)  # right padding with pad = EOS
    attn = torch.zeros(3, 5, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r), True
    got = rewards(Rollouts([{}] * 3, ["p"] * 3, ["a"] * 3, ids, attn))
    model = rewards.items[0][1].model
    with torch.no_grad():
        alone = torch.stack([model(torch.tensor([r]))[0, 0] for r in rows])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_a_reward_model_with_another_tokenizer_is_refused_in_one_line(tmp_path, policy_dir):
    other_dir = tiny_model_dir(tmp_path / "other", special_tokens=["<x>"])
    backbone, tok = load_model(other_dir)
    rm = SequenceClassifier(backbone, ["reward"], scalar=True)
    ensure_pad_token(rm, tok)
    save_model(rm, tmp_path / "rm", tokenizer=tok)
    _, policy_tok = load_model(policy_dir)
    with pytest.raises(ConfigError, match="another tokenizer than the policy.*retokenize=true") as e:
        Rewards([RewardConfig(kind="model", model=str(tmp_path / "rm"))], policy_tok)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,match", [("raises", r"reward function tests.rl_rewards:raises raised KeyError.*"
                                                   r"on prompt 'What is 1 plus one\?'"),
                                        ("not_finite", r"tests.rl_rewards:not_finite returned nan on prompt "
                                                       r"'What is 1 plus one\?'")])
def test_a_reward_function_that_raises_or_returns_non_finite_is_one_line(name, match):
    rewards = Rewards([RewardConfig(kind="function", function=f"tests.rl_rewards:{name}")])
    r = Rollouts([{"answer": "2"}], ["What is 1 plus one?"], ["2"], torch.zeros(1, 2, dtype=torch.long),
                 torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(DataError, match=match) as e:
        rewards(r)
    assert "\n" not in str(e.value)


def test_weighted_rewards_sum_and_keep_each_part():
    rewards = Rewards([RewardConfig(kind="verifier", weight=2.0),
                       RewardConfig(kind="function", function="tests.rl_rewards:digits", weight=0.5)])
    r = Rollouts([{"answer": "12", "check": "number"}, {"answer": "3", "check": "number"}], ["p", "q"],
                 ["12", "no idea"], torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool))
    total = rewards(r)
    torch.testing.assert_close(total, torch.tensor([2.0 + 0.5 * (0.5 + 0.1), 0.5 * 0.2]))
    assert rewards.last["verifier"].tolist() == [1.0, 0.0]


def test_a_missing_verifier_field_is_named_in_one_line():
    with pytest.raises(DataError, match=r"prompts.jsonl record 1: no 'check' field, which the verifier reward reads"):
        check_verifier_fields([{"answer": "1", "check": "number"}, {"answer": "2"}], "prompts.jsonl")


def test_prompts_longer_than_the_limit_are_counted_and_left_out(policy_dir):
    model, tok = load_model(policy_dir)
    fmt, _ = chat_format(ChatConfig(), model, tok)
    records = [{"prompt": "What is 1 plus one?"}, {"prompt": " ".join(["Mira lives in Tovel."] * 40)},
               {"prompt": "What is 2 plus one?"}]
    prompts, too_long = encode_prompts(records, fmt, 40, "p.jsonl")
    assert too_long == 1 and [p.text for p in prompts] == ["What is 1 plus one?", "What is 2 plus one?"]
    assert all(isinstance(p, Prompt) and len(p.ids) <= 40 for p in prompts)
    assert isinstance(fmt, ChatFormat)
