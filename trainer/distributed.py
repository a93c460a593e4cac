"""The collectives the GRPO step needs (gloo on CPU, NCCL on GPU), the data-parallel strategy
(DDP-style gradient all-reduce or FSDP2) and full state dicts for publishing.

Every function works with and without an initialised process group (world size 1), so the
update can be tested in one process.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from deepeyes.config import Config


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_max(value: float, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj: Any) -> list[Any]:
    if world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum gradients over workers in one flat buffer (CPU data parallel; FSDP2 does its own)."""
    if world()[1] == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def use_fsdp2(cfg: Config, world_size: int) -> bool:
    """trainer.parallel: fsdp2, ddp, or auto (FSDP2 on GPU with more than one worker, else DDP)."""
    parallel = cfg.trainer.parallel
    if parallel == "auto":
        return cfg.trainer.use_gpu and world_size > 1
    if parallel == "fsdp2" and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("trainer.parallel=fsdp2 needs a torch.distributed process group (the Ray Train "
                           "workers set one up); outside Ray Train call dist.init_process_group first, "
                           "or set trainer.parallel=ddp")
    return parallel == "fsdp2"


def shard_fsdp2(model: Any, mp_policy: Any = None) -> None:
    """FSDP2 (gloo on CPU, NCCL on GPU): one unit per decoder layer; the root unit holds the rest.

    The vision tower stays in the root unit: a unit of its own would all-gather only on ranks
    whose micro-batch has images, and the ranks' collectives would no longer pair up. Gradients
    are summed, not averaged, over ranks (the loss is already divided by the global token count,
    like `all_reduce_grads`), and parameters unused on a rank (no image) reduce as zeros.
    Every rank must run the same number of forward/backward passes (micro-batches). With
    `mp_policy` (trainer/precision.py) the shards stay in the master dtype and compute is cast.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard  # torch.distributed: only with FSDP2 or a process group

    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}  # trainer/precision.py
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM/AVG)
    model.set_reduce_scatter_unused_params(True)


def cpu_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Full CPU state dict; under FSDP2 gathered from the shards onto rank 0 only (others get {})."""
    try:
        # torch.distributed: only with FSDP2 or a process group
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if dist.is_initialized() and any(type(p).__name__ == "DTensor" for p in model.parameters()):
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    except ImportError:
        pass
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
