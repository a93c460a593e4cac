"""Padding-free packing: variable-length trajectories share one row per micro-batch.

Sequences are placed first-fit-decreasing into micro-batches of at most `budget` tokens and
concatenated into a single row. Attention stays within each sequence because the model gets
4-row position ids (row 0: text positions restarting at 0 per sequence, from which transformers
builds a block-causal mask; rows 1-3: each sequence's own 3-D M-RoPE positions) and no attention
mask. Images of all sequences go to the vision tower in order. Nothing is padded, so a batch of
one long and many short episodes costs its real token count, not longest x count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from deepeyes.policy import mrope_position_ids
from services.rollout.logprobs import sequence_logprobs


@dataclass
class Example:
    """One trajectory ready for the update (all tensors 1-D over its L tokens unless noted)."""

    input_ids: torch.Tensor            # (L,) prompt + response
    loss_mask: torch.Tensor            # (L,) 1 where the token was sampled by the policy
    advantage: float
    pixel_values: torch.Tensor | None  # (patches, dim) of this sequence's images, in order
    image_grid_thw: torch.Tensor | None  # (n_images, 3)
    positions: torch.Tensor            # (3, L) M-RoPE positions
    old_logp: torch.Tensor | None = None  # (L,) log-prob of token t under the behaviour policy
    ref_logp: torch.Tensor | None = None
    behaviour_logp: torch.Tensor | None = None  # (L,) the engine's sampling log-probs (off-policy samples)

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def make_example(model: Any, input_ids: Sequence[int], loss_mask: Sequence[int],
                 advantage: float, pixel_values: torch.Tensor | None,
                 image_grid_thw: torch.Tensor | None) -> Example:
    ids = torch.tensor(list(input_ids), dtype=torch.long)
    return Example(ids, torch.tensor(list(loss_mask), dtype=torch.float32), float(advantage),
                   pixel_values, image_grid_thw, mrope_position_ids(model, ids, image_grid_thw))


def plan_micro_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bins of total length <= budget; an over-long sequence sits alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


@dataclass
class Packed:
    input_ids: torch.Tensor        # (1, T)
    position_ids: torch.Tensor     # (4, 1, T)
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    targets: torch.Tensor          # (T,) next token (0 where none)
    target_mask: torch.Tensor      # (T,) 1 where position t predicts a policy token
    advantages: torch.Tensor       # (T,) advantage of the sequence, per position
    old_logp: torch.Tensor | None  # (T,) aligned with targets
    ref_logp: torch.Tensor | None
    behaviour_logp: torch.Tensor | None = None  # (T,) aligned with targets; None when every sample is fresh


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Value for position t = x[t+1]; the last position gets 0 (it predicts nothing here)."""
    return torch.cat([x[1:], x.new_zeros(1)])


def pack(examples: Sequence[Example]) -> Packed:
    ids, pos, tgt, tmask, adv, old, ref, pvs, grids, beh = [], [], [], [], [], [], [], [], [], []
    for ex in examples:
        n = len(ex)
        ids.append(ex.input_ids)
        text_pos = torch.arange(n).view(1, -1)
        pos.append(torch.cat([text_pos, ex.positions], dim=0))
        tgt.append(_shift(ex.input_ids))
        tmask.append(_shift(ex.loss_mask))
        adv.append(torch.full((n,), ex.advantage))
        if ex.old_logp is not None:
            old.append(_shift(ex.old_logp))
        if ex.ref_logp is not None:
            ref.append(_shift(ex.ref_logp))
        beh.append(_shift(ex.behaviour_logp) if ex.behaviour_logp is not None else None)
        if ex.pixel_values is not None:
            pvs.append(ex.pixel_values)
            grids.append(ex.image_grid_thw)
    return Packed(
        input_ids=torch.cat(ids).view(1, -1),
        position_ids=torch.cat(pos, dim=1).unsqueeze(1),
        pixel_values=torch.cat(pvs) if pvs else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        targets=torch.cat(tgt), target_mask=torch.cat(tmask), advantages=torch.cat(adv),
        old_logp=torch.cat(old) if len(old) == len(examples) else None,
        ref_logp=torch.cat(ref) if len(ref) == len(examples) else None,
        behaviour_logp=_behaviour(beh, tmask),
    )


def _behaviour(per_example: list[torch.Tensor | None], masks: list[torch.Tensor]) -> torch.Tensor | None:
    """Packed behaviour log-probs; None when no example is off-policy. A fresh example in a mixed
    row gets the value that makes its weight 1 (filled in by the loss: NaN marks it)."""
    if all(b is None for b in per_example):
        return None
    return torch.cat([b if b is not None else torch.full_like(m, float("nan")) for b, m in zip(per_example, masks)])


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) (and entropy) from logits (T, V) at the sampling temperature."""
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.view(-1, 1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def packed_forward(model: Any, packed: Packed, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position log-prob of the next token (T,) for a packed row, and entropy if asked.

    A model with a `LogprobHead` (trainer.logit_chunk_tokens) returns them from its head, a chunk
    of positions at a time; otherwise from the full (T, V) logits."""
    head = model.lm_head if isinstance(model.lm_head, LogprobHead) else None
    if head is not None:
        head.targets, head.temperature = packed.targets, temperature
    try:
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                    pixel_values=packed.pixel_values, image_grid_thw=packed.image_grid_thw, use_cache=False)
    finally:
        if head is not None:
            head.targets = None
    if head is not None:  # (1, T, 2): [log p(target), entropy] per position
        return out.logits[0, :, 0], out.logits[0, :, 1] if with_entropy else None
    return token_logprobs(out.logits[0], packed.targets, temperature, with_entropy)


class LogprobHead(torch.nn.Module):
    """The output projection that never holds the whole (T, V) logits: given the targets, it returns
    (1, T, 2) = per position [log p(target), entropy], computed `chunk` positions at a time, each
    chunk's logits recomputed in backward (activation checkpointing). At the 7B's vocabulary
    (152,064) one fp32 copy of the logits is 0.6 MB a token, 15 GB at a 24,576-token micro-batch;
    with chunks of 2,048 positions the head holds about 1.2 GB at a time (`python -m trainer plan`).
    It runs inside the model's forward, so FSDP2 has the projection's weight gathered; it holds
    the projection's own Parameter as `weight`, so state dicts keep the name `lm_head.weight`."""

    def __init__(self, weight: torch.nn.Parameter, chunk: int):
        super().__init__()
        self.weight, self.chunk = weight, chunk
        self.targets: torch.Tensor | None = None
        self.temperature = 1.0

    def _chunk(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp, ent = token_logprobs(F.linear(hidden, self.weight), targets, self.temperature, with_entropy=True)
        return torch.stack([logp, ent], dim=-1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:  # not from packed_forward (e.g. generate): the plain projection
            return F.linear(hidden, self.weight)
        h = hidden[0]
        parts = [torch.utils.checkpoint.checkpoint(self._chunk, h[i:i + self.chunk], self.targets[i:i + self.chunk],
                                                   use_reentrant=False)
                 for i in range(0, h.shape[0], self.chunk)]
        return torch.cat(parts)[None]


def install_logprob_head(model: Any, chunk: int) -> None:
    """Replace the model's output projection (a Linear without bias) by a `LogprobHead` over the
    same weight; before FSDP2 sharding (the head then owns the parameter)."""
    if chunk > 0 and not isinstance(model.lm_head, LogprobHead):
        if model.lm_head.bias is not None:
            raise ValueError("trainer.logit_chunk_tokens: the output projection has a bias; set it to 0")
        model.lm_head = LogprobHead(model.lm_head.weight, chunk)


def padded_forward(model: Any, examples: Sequence[Example], pad_id: int,
                   temperature: float = 1.0) -> list[torch.Tensor]:
    """Reference path: a right-padded batch through the rollout's teacher-forced log-probs.

    Returns per example (L,) next-token log-probs (position t scores token t+1; the last is 0),
    aligned like `packed_forward`. Positions come from the attention mask, not from the packing.
    """
    L = max(len(e) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), L), dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, :len(e)] = e.input_ids
        att[b, :len(e)] = 1
    pvs = [e.pixel_values for e in examples if e.pixel_values is not None]
    grids = [e.image_grid_thw for e in examples if e.image_grid_thw is not None]
    lp = sequence_logprobs(model, ids, att, torch.cat(pvs) if pvs else None,
                           torch.cat(grids) if grids else None, temperature)
    return [_shift(lp[b, :len(e)]) for b, e in enumerate(examples)]
