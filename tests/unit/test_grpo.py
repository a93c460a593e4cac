"""GRPO advantages and the clipped loss against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.grpo import clipped_policy_loss, group_advantages, zero_variance_groups


def test_group_advantages_by_hand():
    rewards = [1.0, 0.0, 2.0, 2.0, 2.0, 0.6, 0.8, -0.2, 0.8, 1.8]
    groups = ["a", "a", "b", "b", "b", "c", "d", "d", "d", "d"]
    adv = group_advantages(rewards, groups)
    # a: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.70710678
    sa = math.sqrt(0.5) + 1e-6
    # b: zero variance -> 0 / (0 + 1e-6) = 0;  c: a group of one -> 0
    # d: mean 0.8, deviations 0, -1, 0, 1, unbiased var 2/3, std 0.81649658
    sd = math.sqrt(2 / 3) + 1e-6
    expected = [0.5 / sa, -0.5 / sa, 0, 0, 0, 0, 0, -1 / sd, 0, 1 / sd]
    assert adv == pytest.approx(expected, abs=1e-9)
    assert zero_variance_groups(rewards, groups) == {"b", "c"}


def test_clipped_loss_by_hand():
    # token 1: A=+1, ratio 1.5 -> unclipped -1.5, clipped -1.2 -> max -1.2 (clipped)
    # token 2: A=-1, ratio 0.5 -> unclipped 0.5, clipped 0.8 -> max 0.8 (clipped)
    # token 3: A=+1, ratio 1.0 -> -1.0 both
    # token 4: masked out (A=5, ratio 3 would dominate otherwise)
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.0, 3.0]))
    adv = torch.tensor([1.0, -1.0, 1.0, 5.0])
    mask = torch.tensor([1, 1, 1, 0])
    parts = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert parts.pg_loss_sum.item() == pytest.approx(-1.2 + 0.8 - 1.0, abs=1e-6)
    assert parts.clipped_sum == 2
    # clip-high 0.28: token 1 now clips at 1.28 -> -1.28
    hi = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert hi.pg_loss_sum.item() == pytest.approx(-1.28 + 0.8 - 1.0, abs=1e-6)


def test_on_policy_gradient_is_advantage_weighted_score():
    # ratio == 1 at the update: d loss / d logp_t = -A_t on mask tokens, 0 elsewhere
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([0.7, -1.3, 2.0])
    parts = clipped_policy_loss(logp, logp.detach(), adv, torch.tensor([1, 1, 0]), clip_eps=0.2)
    parts.pg_loss_sum.backward()
    assert logp.grad.tolist() == pytest.approx([-0.7, 1.3, 0.0], abs=1e-6)


def test_kl_k3_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.25]))
    parts = clipped_policy_loss(logp, logp, torch.zeros(2), torch.ones(2), 0.2, ref_logp=ref)
    # k3 = exp(ref - logp) - (ref - logp) - 1: token 1: 0.5 - ln 0.5 - 1 = 0.19314718; token 2: 0
    assert parts.kl_sum.item() == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6)


def test_off_policy_tokens_get_the_truncated_importance_weight_by_hand():
    """Decoupled PPO (issue 17): loss_t = min(pi_prox/mu, cap) * PPO_t; without behaviour log-probs,
    or with mu = pi_prox, it is exactly today's loss (max_staleness = 0 changes nothing)."""
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    prox = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    adv, mask = torch.tensor([1.0, -1.0, 2.0, 1.0]), torch.tensor([1, 1, 1, 0])
    plain = clipped_policy_loss(logp, prox, adv, mask, 0.2)
    same = clipped_policy_loss(logp, prox, adv, mask, 0.2, behaviour_logp=prox.clone())
    assert float(plain.pg_loss_sum) == float(same.pg_loss_sum) == -(1.0 - 1.0 + 2.0)  # ratio 1: -sum(A)
    # mu: token 0 sampled at half the proximal probability (w = 2, at the cap), token 1 at twice
    # it (w = 0.5), token 2 at a tenth (w = 10 -> capped at 2), token 3 fresh (NaN: w = 1, masked anyway)
    mu = torch.tensor([-1.0 - math.log(2), -2.0 + math.log(2), -0.5 - math.log(10), float("nan")])
    off = clipped_policy_loss(logp, prox, adv, mask, 0.2, behaviour_logp=mu, behaviour_cap=2.0)
    assert float(off.pg_loss_sum) == pytest.approx(-(2.0 * 1.0 + 0.5 * -1.0 + 2.0 * 2.0))
    off.pg_loss_sum.backward()
    assert logp.grad.tolist() == pytest.approx([-2.0, 0.5, -4.0, 0.0])  # the weight scales the gradient, not learned
