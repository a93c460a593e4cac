"""GRPO maths: group advantages and the clipped policy loss (docs/design.md, "GRPO").

Pure torch, no Ray: the Train workers and the tests call these directly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

ADV_EPS = 1e-6


def group_advantages(rewards: Sequence[float], group_ids: Sequence[str]) -> list[float]:
    """(r - mean) / (std + 1e-6) within each prompt group; std is unbiased; a group of one gets 0."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        groups[g].append(i)
    adv = [0.0] * len(rewards)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        r = torch.tensor([float(rewards[i]) for i in idx], dtype=torch.float64)
        a = (r - r.mean()) / (r.std(unbiased=True) + ADV_EPS)
        for i, v in zip(idx, a.tolist()):
            adv[i] = v
    return adv


def zero_variance_groups(rewards: Sequence[float], group_ids: Sequence[str]) -> set[str]:
    """Groups whose rewards are all equal (DAPO drops them: they carry no gradient)."""
    seen: dict[str, set[float]] = defaultdict(set)
    for r, g in zip(rewards, group_ids):
        seen[g].add(round(float(r), 9))
    return {g for g, values in seen.items() if len(values) == 1}


@dataclass
class LossParts:
    """Sums over loss tokens (divide by the global token count for token-mean)."""

    pg_loss_sum: torch.Tensor      # differentiable
    clipped_sum: float
    kl_sum: torch.Tensor | None


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_eps: float, clip_eps_high: float = 0.0,
                        ref_logp: torch.Tensor | None = None, behaviour_logp: torch.Tensor | None = None,
                        behaviour_cap: float = 2.0) -> LossParts:
    """PPO clipped surrogate per token, summed over mask tokens.

    ratio = exp(logp - old_logp); loss_t = max(-A r, -A clip(r, 1-eps, 1+eps_high)). With
    clip_eps_high = 0 the clip is symmetric. With ref_logp, also the k3 KL estimate to the
    reference policy, summed the same way.

    Off-policy samples (trainer.max_staleness > 0: an episode sampled by an older policy
    version, the behaviour policy mu) use decoupled PPO (Hilton et al. 2021; AReaL): `old_logp`
    is then the proximal policy's (the current weights before this update) and each token's loss
    is weighted by the truncated importance weight w_t = min(pi_prox(t) / mu(t), behaviour_cap),
    detached, with mu(t) = exp(behaviour_logp) as the engine sampled it:
        loss_t = w_t * max(-A r_t, -A clip(r_t, 1-eps, 1+eps_high)),  r_t = pi_theta(t) / pi_prox(t).
    Without behaviour_logp (on-policy, k = 0) the loss is exactly the PPO one above.
    """
    high = clip_eps_high if clip_eps_high > 0 else clip_eps
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if behaviour_logp is not None:  # NaN marks a fresh sample packed with off-policy ones: weight 1
        mu = torch.where(torch.isnan(behaviour_logp), old_logp, behaviour_logp)
        per_token = per_token * torch.exp(old_logp - mu).clamp(max=behaviour_cap).detach()
    kl_sum = None
    if ref_logp is not None:
        d = ref_logp - logp
        kl_sum = ((torch.exp(d) - d - 1.0) * mask).sum()
    return LossParts(
        pg_loss_sum=(per_token * mask).sum(),
        clipped_sum=float(((clipped > unclipped).to(logp.dtype) * mask).sum()),
        kl_sum=kl_sum,
    )
