"""PPO math against values worked out by hand (see the comments for the arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lm.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    exact_kl,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


def test_gae_by_hand():
    # gamma=1, lam=0.5: delta2 = 1 - 0.3 = 0.7; delta1 = 0.3 - 0.4 = -0.1; delta0 = 0.4 - 0.5 = -0.1
    # A2 = 0.7; A1 = -0.1 + 0.5 * 0.7 = 0.25; A0 = -0.1 + 0.5 * 0.25 = 0.025
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert close(adv, [[0.025, 0.25, 0.7]])
    assert close(ret, [[0.525, 0.65, 1.0]])


def test_gae_discount_and_mask():
    # gamma=0.9, lam=1 (Monte-Carlo): A1 = 2; A0 = 1 + 0.9 * 2 = 2.8
    adv, _ = gae(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert close(adv, [[2.8, 2.0]])
    # A padded position contributes nothing, whatever reward or value sits there:
    # A1 = 1 - 0.4 = 0.6; A0 = (0.4 - 0.5) + 0.5 * 0.6 = 0.2
    adv, ret = gae(torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.4, 7.0]]), torch.tensor([[1, 1, 0]]),
                   gamma=1.0, lam=0.5)
    assert close(adv, [[0.2, 0.6, 0.0]])
    assert close(ret, [[0.7, 1.0, 0.0]])


def test_policy_loss_by_hand():
    # ratios 1.5, 0.5, 1.1; advantages 1, 1, -1; eps 0.2
    # token0: max(-1.5, -1.2) = -1.2 (clipped); token1: max(-0.5, -0.8) = -0.5; token2: max(1.1, 1.1) = 1.1
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    loss, stats = policy_loss(logprobs, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, -1.0]]), torch.ones(1, 3), 0.2)
    assert close(loss, (-1.2 - 0.5 + 1.1) / 3)
    assert close(stats["clipfrac"], 1 / 3)
    assert close(stats["approxkl"], 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3)


def test_policy_loss_ignores_masked_tokens_and_has_the_right_gradient():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[2.0, 100.0]]), torch.tensor([[1, 0]]), 0.2)
    loss.backward()
    # d/dlogp of -A * exp(logp - old) at ratio 1 is -A, and the masked token gets no gradient
    assert close(logprobs.grad, [[-2.0, 0.0]])


def test_value_loss_by_hand():
    # old values 0; new 0.5, 0.1; returns 1, -1; clip 0.2
    # t0: clipped value 0.2, errors (0.5-1)^2=0.25 vs (0.2-1)^2=0.64 -> 0.64 (clipped); t1: 1.21 both
    loss, stats = value_loss(torch.tensor([[0.5, 0.1]]), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]),
                             torch.ones(1, 2), 0.2)
    assert close(loss, 0.5 * (0.64 + 1.21) / 2)
    assert close(stats["clipfrac"], 0.5)


def test_kl_estimators_by_hand():
    # p = 0.5 under the policy, 0.25 under the reference: log ratio = log 2
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert close(kl_penalty(logp, ref, "k1"), [math.log(2)])
    assert close(kl_penalty(logp, ref, "k3"), [0.5 - 1 + math.log(2)])
    # k3 is never negative, even where k1 is
    assert close(kl_penalty(ref, logp, "k3"), [2 - 1 - math.log(2)])
    assert kl_penalty(ref, logp, "k1").item() < 0
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref, "k2")


def test_kl_estimators_are_unbiased():
    # Sampling from p, both estimators average to KL(p || q) computed exactly.
    torch.manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    exact = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 200_000, replacement=True)
    for estimator in ("k1", "k3"):
        assert abs(kl_penalty(p.log()[x], q.log()[x], estimator).mean() - exact) < 0.01


def test_exact_kl_by_hand():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln(2) + 1/2 ln(2/3); logits are log-probs up to a shift per row
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert close(exact_kl(p.log() + 3.0, q.log() - 1.0), [expected])
    # (batch, length, vocab) -> (batch, length); identical distributions give 0
    logits = torch.stack([p.log(), q.log()])[None]
    assert close(exact_kl(logits, torch.stack([q.log(), q.log()])[None]), [[expected, 0.0]])
    # the temperature divides both sets of logits: at T = 2, p' = softmax(log p / 2) = (1/2, 1/2), q' ~ (1, sqrt 3)
    q2 = torch.tensor([1.0, math.sqrt(3)]) / (1 + math.sqrt(3))
    assert close(exact_kl(p.log(), q.log(), temperature=2.0), [(0.5 * (0.5 / q2).log()).sum()])


def test_exact_kl_is_what_k1_estimates_and_sees_unsampled_tokens():
    # The policy moved 2% of its mass onto a token the reference gives 1e-6. k1 on a batch of samples that missed
    # that token reports less KL than there is; the exact KL counts it at every state.
    p, q = torch.tensor([0.98, 0.02]), torch.tensor([1 - 1e-6, 1e-6])
    exact = exact_kl(p.log(), q.log())
    assert close(exact, (p * (p / q).log()).sum())
    missed = kl_penalty(p.log()[torch.zeros(20, dtype=torch.long)], q.log()[torch.zeros(20, dtype=torch.long)], "k1")
    assert missed.mean() < 0 < 0.1 < exact
    torch.manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True)
    assert abs(kl_penalty(p.log()[x], q.log()[x], "k1").mean() - exact) < 0.01


def test_token_rewards_by_hand():
    kl = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.7]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = token_rewards(torch.tensor([2.0, 3.0]), kl, 0.1, mask)
    assert close(rewards, [[-0.1, -0.1, 1.9], [-0.05, 2.95, 0.0]])


def test_adaptive_kl_controller_by_hand():
    # Ziegler et al.: error = clip(kl / target - 1, -0.2, 0.2); value *= 1 + error * n / horizon
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 256)  # error 0.5 -> clipped to 0.2
    assert close(ctl.value, 0.2 * (1 + 0.2 * 256 / 10000))
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(6.6, 256)  # error 0.1
    assert close(ctl.value, 0.2 * (1 + 0.1 * 256 / 10000))
    ctl.update(0.0, 256)  # error -1 -> -0.2: the coefficient shrinks when KL is under target
    assert close(ctl.value, 0.2 * (1 + 0.1 * 256 / 10000) * (1 - 0.2 * 256 / 10000))
    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


def test_masked_statistics_and_whitening():
    x, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0])
    assert close(masked_mean(x, mask), 2.0)
    assert close(masked_whiten(x, mask), [-1.0, 0.0, 1.0, 0.0], tol=1e-4)  # unbiased var of 1, 2, 3 is 1
    assert close(masked_whiten(x, mask, shift_mean=False), [1.0, 2.0, 3.0, 0.0], tol=1e-4)


def test_running_moments_match_the_whole_batch():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    assert close(moments.mean, 3.0) and close(moments.var, 2.0)  # population variance of 1..5
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert close(restored.normalize(torch.tensor([3.0 + math.sqrt(2.0)])), [1.0])
