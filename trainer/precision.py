"""Mixed precision of the Train workers: fp32 master weights and optimizer state, compute in
model.dtype (docs/design.md, "GRPO").

With bf16 parameters and bf16 AdamW state, DeepEyes' step of lr 1e-6 rounds away on almost every
weight (bf16 keeps 8 bits of mantissa), so the masters stay in `trainer.master_dtype` (fp32) and
only the compute is cast: under FSDP2 by its `MixedPrecisionPolicy` (bf16 parameters gathered for
the forward, gradients reduced in fp32 into the fp32 shards), under DDP or on one worker by
autocast around each forward. The rollout engines get the weights in their own dtype
(`engine_weights`), the checkpoint keeps the masters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch

from deepeyes.config import Config


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def is_mixed(cfg: Config) -> bool:
    """True when the compute dtype differs from the master weights' dtype."""
    return cfg.model.dtype != cfg.trainer.master_dtype


def fsdp_mixed_precision(cfg: Config) -> Any:
    """FSDP2's policy: parameters gathered in model.dtype, gradients reduced in fp32; None = no cast."""
    if not is_mixed(cfg):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy  # torch.distributed: only with FSDP2

    return MixedPrecisionPolicy(param_dtype=torch_dtype(cfg.model.dtype), reduce_dtype=torch.float32)


def forward_context(cfg: Config, device: torch.device, fsdp: bool) -> Callable[[], ContextManager]:
    """What each forward of the update runs in: autocast to model.dtype under DDP or on one worker
    when the masters are wider; nothing under FSDP2 (its policy casts) or without mixed precision."""
    if fsdp or not is_mixed(cfg):
        return contextlib.nullcontext
    dtype = torch_dtype(cfg.model.dtype)
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def cast_floats(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in `dtype` (integer buffers untouched); no copy where already there."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def engine_weights(state_dict: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """What weight sync publishes: the masters cast to the engines' dtype (model.dtype)."""
    return cast_floats(state_dict, torch_dtype(cfg.model.dtype))


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each layer's activations in backward (transformers' own wrapper, non-reentrant:
    it works with FSDP2 and with inputs that need no grad)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
