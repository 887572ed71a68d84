"""Generation inside a training loop (issue 24, item 3): G samples from one prefill, log-probs a teacher-forced pass
reproduces, sampling randomness a checkpoint keeps.  The 2-rank DDP and FSDP cases are in test_rollout_dist.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.core.errors import ConfigError
from lmforge.eval.generate import generate
from lmforge.eval.sampling import GenerationConfig, SamplingRNG, completion_batch
from lmforge.models.decoder import DecoderLM
from lmforge.models.decoder_config import DecoderConfig
from lmforge.objectives.causal_lm import CausalLMObjective
from lmforge.objectives.logprobs import token_logprobs
from lmforge.train import RunSpec, Trainer, TrainerConfig

pytestmark = pytest.mark.usefixtures("one_thread")
V, EOS = 61, 2
FLAVOURS = {"gpt2": dict(family="gpt2"), "llama": dict(family="llama", n_kv_head=2, tie_embeddings=False)}
PROMPTS = [[5, 9, 11, 3, 7, 30], [4, 8], [12, 13, 14, 15]]  # different lengths: left padding in play


def model_of(flavour: str = "llama") -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(DecoderConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_ff=48, max_seq_len=48,
                                   eos_token_id=EOS, pad_token_id=0, dropout=0.0, **FLAVOURS[flavour]))


def forward_shapes(model: DecoderLM) -> tuple[list[tuple[int, ...]], torch.utils.hooks.RemovableHandle]:
    shapes: list[tuple[int, ...]] = []
    handle = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_g_samples_prefill_each_prompt_once():
    model = model_of()
    shapes, handle = forward_shapes(model)
    G, N = 4, 6
    results = generate(model, PROMPTS, GenerationConfig(max_new_tokens=N, temperature=1.0, ignore_eos=True),
                       num_samples=G, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert len(results) == len(PROMPTS) * G
    assert shapes[0] == (len(PROMPTS), max(map(len, PROMPTS)))  # one prefill over the prompts, not over B*G rows
    assert shapes[1:] == [(len(PROMPTS) * G, 1)] * (N - 1)  # then one token per row per step
    assert [r.prompt_tokens for r in results] == [len(p) for p in PROMPTS for _ in range(G)]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_shared_prefill_equals_independent_rows(temperature):
    """Sample j of prompt i is what the same prompt repeated as its own row draws with the same randomness."""
    model = model_of()
    cfg = GenerationConfig(max_new_tokens=8, temperature=temperature, eos_token_id=EOS)
    G = 3
    shared = generate(model, PROMPTS, cfg, num_samples=G, generator=torch.Generator().manual_seed(5))
    rows = [p for p in PROMPTS for _ in range(G)]
    alone = generate(model, rows, cfg, generator=torch.Generator().manual_seed(5))
    assert [r.tokens for r in shared] == [r.tokens for r in alone]
    assert [r.finish_reason for r in shared] == [r.finish_reason for r in alone]
    for a, b in zip(shared, alone):
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-5) and np.allclose(a.raw_logprobs, b.raw_logprobs, atol=1e-5)
    if temperature > 0:  # the G samples of a prompt are different draws
        assert len({tuple(r.tokens) for r in shared[:G]}) > 1


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
@pytest.mark.parametrize("grad_mode", ["inference", "no_grad"])
def test_returned_logprobs_equal_a_teacher_forced_pass(flavour, temperature, grad_mode):
    """Per token, fp32: ``logprobs`` = the helper at the sampling temperature (no top-k/top-p), ``raw_logprobs`` =
    the helper at T = 1 -- the numbers PPO's ratio and GRPO's KL take from a training forward."""
    model = model_of(flavour)
    G = 4
    cfg = GenerationConfig(max_new_tokens=10, temperature=temperature, eos_token_id=EOS)
    results = generate(model, PROMPTS, cfg, num_samples=G, generator=torch.Generator().manual_seed(1),
                       grad_mode=grad_mode)
    assert {r.finish_reason for r in results} <= {"eos", "length"}
    batch = completion_batch(PROMPTS, results, pad_id=0, num_samples=G)
    with torch.no_grad():
        at_t = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["score_mask"],
                              temperature=temperature or 1.0)
        at_1 = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["score_mask"])
    for i, r in enumerate(results):
        scored = batch["score_mask"][i]
        assert int(scored.sum()) == len(r.tokens)
        torch.testing.assert_close(at_t.logprobs[i][scored], torch.tensor(r.logprobs), atol=1e-5, rtol=0)
        torch.testing.assert_close(at_1.logprobs[i][scored], torch.tensor(r.raw_logprobs), atol=1e-5, rtol=0)


def test_no_grad_mode_returns_no_inference_state_and_the_model_trains_on():
    """Generating under no_grad between two training steps leaves the model trainable (no inference tensors
    anywhere it keeps) and in the mode it was in."""
    model = model_of().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    generate(model, PROMPTS, GenerationConfig(max_new_tokens=4, temperature=1.0), grad_mode="no_grad",
             generator=torch.Generator().manual_seed(0))
    assert model.training
    assert not any(p.is_inference() for p in model.parameters())
    loss = model.lm_head(model(torch.tensor([PROMPTS[0]]))).logsumexp(-1).mean()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_num_samples_must_be_a_whole_number(bad):
    with pytest.raises(ConfigError, match="num_samples"):
        generate(model_of(), PROMPTS, GenerationConfig(max_new_tokens=2), num_samples=bad)


def test_unknown_grad_mode_is_refused():
    with pytest.raises(ConfigError, match="grad_mode"):
        generate(model_of(), PROMPTS, GenerationConfig(max_new_tokens=2), grad_mode="eager")


# ---- sampling randomness a checkpoint keeps ------------------------------------------------------------------


def draw(rng: SamplingRNG, model: DecoderLM) -> list[list[int]]:
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, ignore_eos=True)
    return [r.tokens for r in generate(model, PROMPTS, cfg, num_samples=2, generator=rng.generator())]


def test_sampling_rng_resumed_from_its_state_draws_what_it_would_have(tmp_path: Path):
    model = model_of()
    straight = SamplingRNG(seed=7)
    calls = [draw(straight, model) for _ in range(3)]
    assert calls[0] != calls[1]  # each call draws afresh
    first = SamplingRNG(seed=7)
    draw(first, model)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = SamplingRNG(seed=7)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert [draw(resumed, model), draw(resumed, model)] == calls[1:]


def test_sampling_rng_differs_by_rank_and_refuses_another_seed():
    a, b = SamplingRNG(seed=7, rank=0), SamplingRNG(seed=7, rank=1)
    assert a.generator().initial_seed() != b.generator().initial_seed()
    assert SamplingRNG(7).generator().initial_seed() == SamplingRNG(7).generator().initial_seed()
    with pytest.raises(ConfigError, match="seed 8 is not this run's 7"):
        SamplingRNG(7).load_state_dict({"seed": 8, "calls": 3})


class OnPolicySource:
    """A training source that samples its batches from the model being trained (the shape of an RL loop's
    rollouts): its state -- and so the checkpoint's -- includes the sampling RNG's."""

    def __init__(self, objective: CausalLMObjective, seed: int) -> None:
        self.objective, self.rng, self.trainer, self.drawn = objective, SamplingRNG(seed), None, []

    def next_batch(self, n: int):
        cfg = GenerationConfig(max_new_tokens=6, temperature=1.0, ignore_eos=True)
        prompts = PROMPTS[: max(1, n // 2)]
        results = self.trainer.generate(prompts, cfg, num_samples=2, generator=self.rng.generator())
        self.drawn.append([r.tokens for r in results])
        return self.objective.collate([p + r.tokens for p, r in zip([p for p in prompts for _ in (0, 1)], results)])

    def state_dict(self):
        return {"sampling": self.rng.state_dict()}

    def load_state_dict(self, state):
        self.rng.load_state_dict(state["sampling"])


def run_on_policy(run_dir: Path, steps: int, resume) -> OnPolicySource:
    objective = CausalLMObjective(pad_id=0)
    source = OnPolicySource(objective, seed=11)
    cfg = TrainerConfig(global_batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, ckpt_every=2, keep_last=0,
                        device="cpu", tensorboard=False, fused_adamw="false")
    trainer = Trainer(model_of(), objective, source, cfg, RunSpec(run_dir, steps, seed=3, resume=resume),
                      progress=False)
    source.trainer = trainer
    trainer.fit()
    return source


def test_a_resumed_run_samples_the_tokens_an_uninterrupted_one_did(tmp_path: Path):
    """Through the Trainer's own checkpoint: 4 steps straight vs 2 steps, a new process's worth of objects, resume."""
    straight = run_on_policy(tmp_path / "straight", 4, resume="auto")
    run_on_policy(tmp_path / "split", 2, resume="auto")
    resumed = run_on_policy(tmp_path / "split", 4, resume=True)
    assert len(straight.drawn) == 4 and len(resumed.drawn) == 2
    assert resumed.drawn == straight.drawn[2:]
    assert straight.drawn[2] != straight.drawn[3]
