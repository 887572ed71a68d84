"""The formulas of PPO and GRPO (lmforge/objectives/rl.py): KL estimators, GAE, whitening, PPO's clipped losses,
GRPO's group advantages and every loss aggregation -- against direct loops / the papers' formulas, and GRPO against
TRL 1.16's own ``GRPOTrainer._compute_loss`` run on identical inputs (TRL 1.16 ships no PPO trainer: PPO is checked
against its formulas).  ``dapo`` with gradient accumulation here; with 2 gloo ranks in test_rl_dist.py."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.objectives.rl import (LOSS_TYPES, AdaptiveKL, GRPOObjective, add_scales, aggregate, aggregation_count,
                                   gae, group_advantages, grpo_token_loss, kl_k1, kl_k3, ppo_policy_loss,
                                   ppo_value_loss, whiten)

pytestmark = pytest.mark.usefixtures("one_thread")


def completion_mask(starts, lengths, width) -> torch.Tensor:
    """Rows whose completion starts after a prompt and is followed by padding: the contiguous masks RL uses."""
    m = torch.zeros(len(starts), width, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        m[i, s:s + n] = True
    return m


# ---- KL estimators ------------------------------------------------------------------------------------------

def test_k1_and_k3_are_unbiased_estimators_of_kl_and_k3_is_never_negative():
    """Under exact expectation over the sampling distribution q (the policy), E_q[k1] = E_q[k3] = KL(q || p)."""
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(50, dtype=torch.float64), 0)
    p = torch.softmax(torch.randn(50, dtype=torch.float64), 0)
    kl = (q * (q.log() - p.log())).sum()
    logq, logp = q.log(), p.log()
    assert torch.allclose((q * kl_k1(logq, logp)).sum(), kl, atol=1e-12)
    assert torch.allclose((q * kl_k3(logq, logp)).sum(), kl, atol=1e-12)
    assert (kl_k3(logq, logp) >= 0).all() and (kl_k1(logq, logp) < 0).any()
    # the definitions themselves: log r = log p_ref - log q
    r = torch.exp(logp - logq)
    assert torch.allclose(kl_k3(logq, logp), (r - 1) - (logp - logq))


# ---- GAE and whitening --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_equals_the_sum_of_discounted_td_errors(gamma, lam):
    torch.manual_seed(1)
    mask = completion_mask([3, 1, 5], [4, 7, 1], 10)
    rewards, values = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i in range(3):
        cols = mask[i].nonzero().flatten().tolist()
        r, v = [float(rewards[i, c]) for c in cols], [float(values[i, c]) for c in cols] + [0.0]  # V after = 0
        n = len(cols)
        for k, c in enumerate(cols):
            want = sum((gamma * lam) ** j * (r[k + j] + gamma * v[k + j + 1] - v[k + j]) for j in range(n - k))
            assert math.isclose(float(adv[i, c]), want, abs_tol=1e-10)
            assert math.isclose(float(ret[i, c]), want + v[k], abs_tol=1e-10)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_whiten_matches_the_masked_formula():
    torch.manual_seed(2)
    mask = completion_mask([0, 2], [5, 3], 6)
    x = torch.randn(2, 6, dtype=torch.float64)
    vals = x[mask]
    want = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=True) + 1e-8)
    assert torch.allclose(whiten(x, mask)[mask], want)
    assert torch.allclose(whiten(x, mask, shift_mean=False)[mask], want + vals.mean())
    assert (whiten(x, mask)[~mask] == 0).all()


# ---- PPO losses ---------------------------------------------------------------------------------------------

def test_ppo_policy_and_value_losses_follow_the_clipped_formulas():
    torch.manual_seed(3)
    logp, old = torch.randn(4, 6) * 0.3, torch.randn(4, 6) * 0.3
    adv, eps = torch.randn(4, 6), 0.2
    loss, clipped = ppo_policy_loss(logp, old, adv, eps)
    for a, lp, lo, l, c in zip(adv.flatten(), logp.flatten(), old.flatten(), loss.flatten(), clipped.flatten()):
        ratio = math.exp(float(lp - lo))
        unclipped, clip = -float(a) * ratio, -float(a) * min(max(ratio, 1 - eps), 1 + eps)
        assert math.isclose(float(l), max(unclipped, clip), rel_tol=1e-5, abs_tol=1e-6)
        assert bool(c) == (clip > unclipped)
    assert clipped.any() and not clipped.all()
    v, v_old, ret = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    vl, vc = ppo_value_loss(v, v_old, ret, 0.2)
    for a, b, r, l in zip(v.flatten(), v_old.flatten(), ret.flatten(), vl.flatten()):
        vclip = min(max(float(a), float(b) - 0.2), float(b) + 0.2)
        assert math.isclose(float(l), 0.5 * max((float(a) - float(r)) ** 2, (vclip - float(r)) ** 2), rel_tol=1e-5)


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    kl = AdaptiveKL(0.1, target=6.0, horizon=100)
    kl.update(12.0, 10)  # twice the target: the error is clipped to +0.2
    assert math.isclose(kl.value, 0.1 * (1 + 0.2 * 10 / 100))
    kl.update(3.0, 10)  # half: -0.2
    assert math.isclose(kl.value, 0.1 * (1 + 0.02) * (1 - 0.02))
    kl.update(6.6, 10)
    assert math.isclose(kl.value, 0.1 * 1.02 * 0.98 * (1 + 0.1 * 0.1))


# ---- GRPO: advantages ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    """TRL 1.16 _generate_and_score_completions (sum_then_normalize), with its own nanstd."""
    from trl.trainer.utils import nanstd
    G = 4
    rewards = torch.tensor([1., 0., 0., 1., 1., 1., 1., 1., 0.3, 0.9, 0.1, 0.])
    mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    want = rewards - mean
    if scale != "none":
        want = want / (std + 1e-4)
    adv, got_std = group_advantages(rewards, G, scale)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(got_std, std)
    assert (adv[4:8] == 0).all()  # a group whose answers all scored alike teaches nothing (frac_reward_zero_std)
    if scale != "batch":
        assert (got_std[4:8] == 0).all() and (got_std[:4] > 0).all()


# ---- GRPO: every aggregation against TRL's _compute_loss ----------------------------------------------------

def trl_loss(loss_type: str, logps: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, adv: torch.Tensor,
             mask: torch.Tensor, beta: float, eps_low: float, eps_high: float, max_len: int, num_items: int,
             grad_accum: int = 1) -> torch.Tensor:
    """TRL 1.16's GRPOTrainer._compute_loss on these exact tensors: an instance without __init__, its per-token
    log-probs (the model forward) replaced by ``logps``."""
    from trl import GRPOTrainer
    t = object.__new__(GRPOTrainer)
    ones = torch.ones(mask.shape[0], 1, dtype=torch.long)
    acc = SimpleNamespace(num_processes=1, gather=lambda x: x.reshape(-1) if x.dim() == 0 else x,
                          reduce=lambda x, reduction="sum": x)
    fields = dict(loss_type=loss_type, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
                  importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                  use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False,
                  aux_loss_enabled=False, current_gradient_accumulation_steps=grad_accum, max_completion_length=max_len,
                  accelerator=acc, model=SimpleNamespace(training=True),
                  args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=grad_accum),
                  _metrics={"train": defaultdict(list)})
    for k, v in fields.items():
        object.__setattr__(t, k, v)
    object.__setattr__(t, "_get_per_token_logps_and_entropies",
                       lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = {"prompt_ids": ones, "prompt_mask": ones, "completion_ids": torch.zeros_like(mask, dtype=torch.long),
              "completion_mask": mask.long(), "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": torch.tensor(float(num_items))}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return t._compute_loss(None, inputs)


def grpo_inputs(seed: int = 4, B: int = 6, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    logps = (torch.randn(B, T, generator=g) * 0.5 - 1).requires_grad_(True)
    old = logps.detach() + torch.randn(B, T, generator=g) * 0.3  # μ > 1: the ratio moves, clipping matters
    ref = logps.detach() + torch.randn(B, T, generator=g) * 0.2
    adv = torch.randn(B, generator=g)
    lengths = [7, 3, 5, 1, 6, 2]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths[:B]):
        mask[i, :n] = True
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_every_aggregation_equals_trl_value_and_gradient(loss_type, beta):
    logps, old, ref, adv, mask = grpo_inputs()
    max_len, eps_low, eps_high = 8, 0.2, 0.28
    want = trl_loss(loss_type, logps, old, ref if beta else None, adv, mask, beta, eps_low, eps_high, max_len,
                    int(mask.sum()))
    (want_grad,) = torch.autograd.grad(want, logps)
    per_token, coef, kl = grpo_token_loss(logps, old, adv, eps_low, eps_high, ref if beta else None, beta)
    loss_sum, count = aggregate(per_token, mask * 1, loss_type, max_len)
    got = loss_sum / aggregation_count(mask, loss_type)
    (got_grad,) = torch.autograd.grad(got, logps)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-7, rtol=1e-5)
    assert ((coef < 1 - eps_low) | (coef > 1 + eps_high))[mask].any()  # the clip is in play


def test_dapo_is_independent_of_gradient_accumulation_and_equals_trl_accumulating():
    """Micro-batches of 1, 2, 3 and 6 rows each divided by the global token count give the one-batch gradient,
    which is TRL's with gradient_accumulation_steps micro-steps (its normaliser: the generation batch's tokens)."""
    logps, old, ref, adv, mask = grpo_inputs()
    N = int(mask.sum())
    full = trl_loss("dapo", logps, old, None, adv, mask, 0.0, 0.2, 0.2, 8, N)
    (full_grad,) = torch.autograd.grad(full, logps)
    for micro in (1, 2, 3, 6):
        grad = torch.zeros_like(logps)
        trl_grad = torch.zeros_like(logps)
        for s in range(0, 6, micro):
            rows = slice(s, s + micro)
            lp = logps.detach()[rows].clone().requires_grad_(True)
            per_token, _, _ = grpo_token_loss(lp, old[rows], adv[rows], 0.2, 0.2)
            loss_sum, _ = aggregate(per_token, mask[rows], "dapo", 8)
            (g,) = torch.autograd.grad(loss_sum / aggregation_count(mask, "dapo"), lp)
            grad[rows] = g
            lp2 = logps.detach()[rows].clone().requires_grad_(True)
            t = trl_loss("dapo", lp2, old[rows], None, adv[rows], mask[rows], 0.0, 0.2, 0.2, 8, N,
                         grad_accum=6 // micro)
            (g2,) = torch.autograd.grad(t, lp2)
            trl_grad[rows] = g2
        torch.testing.assert_close(grad, full_grad, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(trl_grad, full_grad, atol=1e-7, rtol=1e-5)


def test_grpo_objective_metrics_are_global_token_means_however_the_batch_is_split():
    """clip_ratio and kl logged by the Trainer (metric sums / global count) are the global token means."""
    from lmforge.models.decoder import DecoderLM
    from lmforge.models.decoder_config import DecoderConfig
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(family="gpt2", vocab_size=40, d_model=16, n_layer=1, n_head=2, max_seq_len=32,
                                    dropout=0.0))
    B, T = 6, 9
    ids = torch.randint(3, 40, (B, T))
    mask = completion_mask([3, 4, 2, 5, 3, 3], [5, 2, 6, 3, 1, 4], T)
    attn = torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad():
        from lmforge.objectives.logprobs import token_logprobs
        lp = token_logprobs(model, ids, attn, mask).logprobs
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": ids, "attention_mask": attn, "score_mask": mask,
             "old_logps": lp + torch.randn(B, T, generator=g) * 0.3 * mask, "ref_logps": lp * 0.9,
             "advantages": torch.randn(B, generator=g), "stat/reward": torch.arange(B, dtype=torch.float32)}
    for loss_type in LOSS_TYPES:
        obj = GRPOObjective(loss_type=loss_type, eps_low=0.1, eps_high=0.1, beta=0.1, max_completion_length=6)
        full = add_scales(dict(batch), obj.target_count(batch))
        count = obj.target_count(full)
        whole = obj.loss(model, full).metrics
        parts = [obj.loss(model, {k: v[s:s + 2] for k, v in full.items()}).metrics for s in range(0, B, 2)]
        for k in whole:
            split = sum(float(p[k]) for p in parts) / count
            assert math.isclose(float(whole[k]) / count, split, rel_tol=1e-6, abs_tol=1e-9), (loss_type, k)
        assert math.isclose(float(whole["reward"]) / count, 2.5)  # the mean over rollouts
        logp = token_logprobs(model, ids, attn, mask).logprobs.detach()
        kl = kl_k3(logp, batch["ref_logps"])
        assert math.isclose(float(whole["kl"]) / count, float(kl[mask].mean()), rel_tol=1e-5)


def test_on_policy_grpo_needs_no_rollout_forward_and_logs_the_gap_from_the_update():
    """μ = 1: without ``old_logps`` the loss and gradient are those with old = the current log-probs (ratio 1)."""
    from lmforge.models.decoder import DecoderLM
    from lmforge.models.decoder_config import DecoderConfig
    from lmforge.objectives.logprobs import token_logprobs
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(family="gpt2", vocab_size=40, d_model=16, n_layer=1, n_head=2, max_seq_len=32,
                                    dropout=0.0))
    ids = torch.randint(3, 40, (4, 8))
    mask = completion_mask([2, 3, 2, 4], [5, 2, 6, 3], 8)
    attn = torch.ones(4, 8, dtype=torch.bool)
    with torch.no_grad():
        lp = token_logprobs(model, ids, attn, mask).logprobs
    batch = add_scales({"input_ids": ids, "attention_mask": attn, "score_mask": mask, "gen_logps": lp + 1e-3 * mask,
                        "advantages": torch.tensor([1.0, -0.5, 0.3, -0.8])}, int(mask.sum()))
    obj = GRPOObjective(loss_type="dapo")
    out = obj.loss(model, batch)
    grads = torch.autograd.grad(out.loss_sum, list(model.parameters()))
    ref = obj.loss(model, {**batch, "old_logps": lp})
    ref_grads = torch.autograd.grad(ref.loss_sum, list(model.parameters()))
    torch.testing.assert_close(out.loss_sum, ref.loss_sum)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert math.isclose(float(out.metrics["rollout/logprob_gap"]) / out.count, 1e-3, rel_tol=1e-3)
    assert float(out.metrics["clip_ratio/region_mean"]) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_each_prompt_run_once_gives_the_log_probs_and_gradients_of_whole_rows(family):
    """shared_prompt_logprobs (the prompt's keys/values reused by its G answers) = token_logprobs on the full rows,
    also when a micro-batch starts inside a group; GRPO's loss takes it when the batch says which rows share."""
    from lmforge.eval.generate import generate
    from lmforge.eval.sampling import GenerationConfig, completion_batch
    from lmforge.models.decoder import DecoderLM
    from lmforge.models.decoder_config import DecoderConfig
    from lmforge.objectives.logprobs import shared_prompt_logprobs, token_logprobs
    torch.manual_seed(0)
    kw = dict(n_kv_head=2, tie_embeddings=False) if family == "llama" else {}
    model = DecoderLM(DecoderConfig(family=family, vocab_size=61, d_model=32, n_layer=2, n_head=4, d_ff=48,
                                    max_seq_len=48, eos_token_id=2, pad_token_id=0, dropout=0.0, **kw))
    prompts, G = [[5, 9, 11, 3, 7, 30], [4, 8], [12, 13, 14, 15]], 3
    res = generate(model, prompts, GenerationConfig(max_new_tokens=8, temperature=1.0, eos_token_id=2),
                   num_samples=G, generator=torch.Generator().manual_seed(1))
    b = completion_batch(prompts, res, 0, G)
    plen = torch.tensor([len(prompts[i // G]) for i in range(len(res))])
    group = torch.arange(len(res)) // G
    for rows in (slice(0, 9), slice(2, 7)):  # all rows; a slice cutting groups 0 and 2
        args = b["input_ids"][rows], b["attention_mask"][rows], b["score_mask"][rows]
        whole = token_logprobs(model, *args, temperature=0.8, entropy=True)
        shared = shared_prompt_logprobs(model, *args, plen[rows], group[rows], temperature=0.8, entropy=True)
        assert torch.equal(whole.mask, shared.mask)
        torch.testing.assert_close(shared.logprobs, whole.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(shared.entropy, whole.entropy, atol=1e-5, rtol=0)
        w = torch.randn_like(whole.logprobs)
        g_whole = torch.autograd.grad((whole.logprobs * w).sum(), list(model.parameters()))
        g_shared = torch.autograd.grad((shared.logprobs * w).sum(), list(model.parameters()))
        for x, y in zip(g_shared, g_whole):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    batch = add_scales({**b, "prompt_len": plen, "group": group, "advantages": torch.randn(9)}, 0)
    obj = GRPOObjective(loss_type="dapo")
    batch = add_scales(batch, obj.target_count(batch))
    a = obj.loss(model, batch)
    ga = torch.autograd.grad(a.loss_sum, list(model.parameters()))
    b_ = GRPOObjective(loss_type="dapo", share_prompts=False).loss(model, batch)
    gb = torch.autograd.grad(b_.loss_sum, list(model.parameters()))
    torch.testing.assert_close(a.loss_sum, b_.loss_sum, atol=1e-6, rtol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
