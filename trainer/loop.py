"""The GRPO step's maths inside each Ray Train worker (the worker itself: trainer/worker.py).

Every worker samples the same global prompt batch (same seed, same order) and rolls out its own
share of the prompts, all n episodes of a prompt on one worker, so GRPO groups never straddle
workers. Loss is a token-mean over the policy tokens of the GLOBAL batch (the token count is
all-reduced first), so summing the workers' gradients gives the exact full-batch gradient.
Rank 0 publishes the weights (version + 1) after each update; rollout replicas pull that version
before serving a request that asks for it.

Invariant: generation for step s uses exactly the weights published after step s-1
(`min_version` on every request), i.e. on-policy unless trainer.max_staleness says otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, ContextManager, Sequence

import torch

from deepeyes.config import Config
from deepeyes.images import image_key
from deepeyes.policy import Policy, process_images
from services.rollout.trajectory import Trajectory
from trainer.distributed import all_max
from trainer.grpo import clipped_policy_loss
from trainer.metrics import UpdateStats
from trainer.packing import Example, make_example, pack, packed_forward, plan_micro_batches

log = logging.getLogger("deepeyes.trainer")
STORE_TIMEOUT_S = 60.0   # asking the WeightStore actor for its version


# ---------------------------------------------------------------------------------------------
# data order


def total_steps(cfg: Config, num_rows: int) -> int:
    if cfg.trainer.steps > 0:
        return cfg.trainer.steps
    return max(1, math.ceil(num_rows * cfg.trainer.epochs / cfg.trainer.batch_size))


def lr_factor(cfg: Config, step: int, steps: int) -> float:
    """Linear warmup, then constant or cosine to zero."""
    t = cfg.trainer
    if t.warmup_steps and step <= t.warmup_steps:
        return step / t.warmup_steps
    if t.lr_schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, steps - t.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


# ---------------------------------------------------------------------------------------------
# the update


def processed_images(policy: Policy, images: Sequence[Any], seen: dict[tuple[Any, ...], Any],
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """process_images of `images`, each distinct image processed once per `seen` memo (the
    processor treats images independently: its output for a list is the concatenation)."""
    if not images:
        return None, None
    parts = []
    for im in images:
        key = image_key(im)
        if key not in seen:
            seen[key] = process_images(policy, [im])
        parts.append(seen[key])
    return torch.cat([pv for pv, _ in parts]), torch.cat([g for _, g in parts])


def build_examples(policy: Policy, trajs: Sequence[Trajectory], advantages: Sequence[float],
                   mask_over_turn: bool, device: torch.device, version: int = 0) -> list[Example]:
    """Update examples of `trajs`; those sampled before policy `version` carry the engine's
    log-probs as behaviour_logp (off-policy: the loss weights them, trainer/grpo.py)."""
    exs = []
    seen: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # the n samples of a prompt share its image
    for t, a in zip(trajs, advantages):
        pv, grid = processed_images(policy, t.images, seen)
        # The rollout counted <|image_pad|> tokens against these grids (docs/design.md, "Chat format"); the
        # trainer's processor must see the same images the same way, or positions shift.
        if (grid.tolist() if grid is not None else []) != [list(g) for g in t.image_grid_thw]:
            raise ValueError(f"episode {t.uid}: the trainer's image grids {grid.tolist() if grid is not None else []} "
                             f"differ from the rollout's {t.image_grid_thw}: model.min_pixels/max_pixels must "
                             f"match between the rollout app and the trainer")
        mask = [0] * len(t.prompt_ids) + list(t.loss_mask)
        if mask_over_turn and t.finish_reason == "turn_cap":
            mask = [0] * len(mask)
        ex = make_example(policy.model, t.input_ids, mask, a,
                          pv.to(device) if pv is not None else None,
                          grid.to(device) if grid is not None else None)
        ex.input_ids, ex.loss_mask, ex.positions = ex.input_ids.to(device), ex.loss_mask.to(device), ex.positions.to(device)
        if t.policy_version < version:
            ex.behaviour_logp = torch.tensor([0.0] * len(t.prompt_ids) + list(t.logprobs), device=device)
        exs.append(ex)
    return exs


def lockstep_micro_batches(model: Any, examples: Sequence[Example], budget: int) -> list[list[Example]]:
    """The packed micro-batches of `examples`; under FSDP2 padded to the most any rank has.

    FSDP2 all-gathers in every forward and reduce-scatters in every backward, so all ranks must
    run as many passes; a rank with fewer (shorter or fewer episodes) adds one-token examples
    with an empty loss mask, which add exactly zero loss, gradient and token count.
    """
    from torch.distributed.fsdp import FSDPModule  # torch.distributed: only with FSDP2 or a process group

    bins = [[examples[i] for i in mb] for mb in plan_micro_batches([len(e) for e in examples], budget)]
    if not isinstance(model, FSDPModule):
        return bins
    device = next(model.parameters()).device
    idle = [Example(torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, device=device), 0.0, None, None,
                    torch.zeros(3, 1, dtype=torch.long, device=device), old_logp=torch.zeros(1, device=device))
            for _ in range(int(all_max(len(bins), device)) - len(bins))]
    return bins + [[e] for e in idle]


def _store_old_logp(batch: Sequence[Example], lp: torch.Tensor) -> None:
    """Packed per-position log-probs -> each example's per-token old_logp (detached)."""
    offset = 0
    lp = lp.detach()
    for e in batch:
        n = len(e)
        # position t predicts token t+1: store as a per-token log-prob of token t
        e.old_logp = torch.cat([lp.new_zeros(1), lp[offset:offset + n - 1]])
        offset += n


@torch.no_grad()
def behaviour_logprobs(model: Any, examples: Sequence[Example], budget: int, temperature: float,
                       autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
    """Old log-probs (per token of each example) from a teacher-forced pass, before the update."""
    for batch in lockstep_micro_batches(model, examples, budget):
        with autocast():
            lp, _ = packed_forward(model, pack(batch), temperature)
        _store_old_logp(batch, lp)


def update(model: Any, optimizer: Any, examples: Sequence[Example], cfg: Config, global_tokens: float,
           temperature: float, sync_grads: Any,
           autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> UpdateStats:
    """One optimizer step over the local examples; loss normalised by the global token count.

    Examples without old_logp take it from this forward, detached: the weights do not change
    until the one optimizer step at the end, so the behaviour policy of these fresh samples is the
    policy of this forward and the PPO ratio is exactly 1 (what a separate pass would compute,
    at the cost of a whole extra forward over the batch). Their old_logp is filled in for the
    engine/trainer agreement metric.
    """
    t = cfg.trainer
    st = UpdateStats()
    optimizer.zero_grad(set_to_none=True)
    for batch in lockstep_micro_batches(model, examples, t.micro_batch_tokens):
        pk = pack(batch)
        with autocast():  # compute in model.dtype over fp32 masters (trainer/precision.py)
            logp, ent = packed_forward(model, pk, temperature, with_entropy=True)
        old_logp = pk.old_logp
        if old_logp is None:  # on-policy, one update: this forward is the behaviour policy
            old_logp = logp.detach()
            _store_old_logp(batch, old_logp)
        parts = clipped_policy_loss(logp, old_logp, pk.advantages, pk.target_mask, t.clip_eps,
                                    t.clip_eps_high, pk.ref_logp, pk.behaviour_logp, t.behaviour_cap)
        loss = parts.pg_loss_sum
        if t.kl_coef > 0 and parts.kl_sum is not None:
            loss = loss + t.kl_coef * parts.kl_sum
        if t.entropy_coef > 0:
            loss = loss - t.entropy_coef * (ent * pk.target_mask).sum()
        (loss / max(global_tokens, 1.0)).backward()
        st.pg_loss += parts.pg_loss_sum.item()
        st.entropy_sum += float((ent.detach() * pk.target_mask).sum())
        st.clipped += parts.clipped_sum
        st.tokens += float(pk.target_mask.sum())
        st.kl_sum += float(parts.kl_sum) if parts.kl_sum is not None else 0.0
        st.micro_batches += 1
    sync_grads(model)
    st.grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
    optimizer.step()
    return st


def logprob_mismatch(trajs: Sequence[Trajectory], examples: Sequence[Example]) -> float:
    """Max |sampling log-prob - teacher-forced log-prob| over policy tokens (engine/trainer agreement)."""
    worst = 0.0
    for t, e in zip(trajs, examples):
        if e.old_logp is None:  # no update ran (a batch without policy tokens)
            continue
        p = len(t.prompt_ids)
        resp_lp = e.old_logp[p:].detach().cpu()
        sampled = torch.tensor(t.logprobs, dtype=resp_lp.dtype)
        m = torch.tensor(t.loss_mask, dtype=torch.bool)
        if m.any():
            worst = max(worst, float((resp_lp[m] - sampled[m]).abs().max()))
    return worst


class RunHealth:
    """Signals a run must not continue silently on: a judge that keeps failing (stop), and steps
    with no gradient because every group scored the same (warn)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.failing_steps = 0
        self.flat_steps = 0

    def check(self, step: int, gathered: list[dict[str, Any]]) -> str:
        """'' to go on, else why the run stops (judge.stop_failure_share / stop_after_steps)."""
        jc, tc = self.cfg.judge, self.cfg.trainer
        asked_all = sum(g["asked"] for g in gathered)
        failures = sum(g["judge_failures"] for g in gathered)
        failing = asked_all > 0 and failures / asked_all >= jc.stop_failure_share
        self.failing_steps = self.failing_steps + 1 if failing else 0
        groups, flat = sum(g["groups"] for g in gathered), sum(g["flat_groups"] for g in gathered)
        self.flat_steps = self.flat_steps + 1 if groups and flat == groups else 0
        if tc.warn_flat_steps and self.flat_steps == tc.warn_flat_steps:
            hint = ("a random-init policy scores -0.2 everywhere: start from the warm start, model.warm_start=true, "
                    "on both the rollout app and the trainer" if not self.cfg.model.warm_start else
                    "the warm-started policy gets every prompt all right or all wrong: a task it can partly "
                    "solve, more samples per prompt (rollout.n) or a higher temperature give GRPO a signal")
            log.warning("steps %d-%d: every group scored the same for each of its samples, so the update "
                        "had no gradient signal (%s)", step - self.flat_steps + 1, step, hint)
        if jc.stop_after_steps and self.failing_steps >= jc.stop_after_steps:
            return (f"the judge failed {failures} of {asked_all} judgments at step {step}, and at least "
                    f"{jc.stop_failure_share:.0%} for {self.failing_steps} steps in a row: check the judge "
                    f"({jc.backend} at {jc.base_url}); judge.stop_after_steps=0 disables this stop")
        return ""
