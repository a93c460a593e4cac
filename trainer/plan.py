"""`python -m trainer plan`: the GPU memory a config needs, per Train worker GPU and per rollout GPU.

Train worker: the master weights, their gradients and AdamW's two moments (sharded over the workers
under FSDP2), the compute-dtype copies (FSDP2's gathered root unit and two decoder layers, or
autocast's cast weights under DDP), and the activations of the longest micro-batch: the larger of
the forward's end (everything saved for backward, plus the output head's working copies) and late
backward (all gradients, plus one recomputed layer under checkpointing). Rollout GPU: the weights in
model.dtype and the KV cache left at rollout.gpu_memory_utilization.

The per-token activation counts were read off the autograd graph of the Qwen2.5-VL decoder (the
tensors saved for backward, by shape): per layer 9 hidden-sized, 4 intermediate-sized and
2.5 KV-sized vectors; at the head 2 fp32 vocabulary-sized ones. tests/unit/test_memory_plan.py
checks the whole estimate against the measured peak of real update steps on CPU (trainer/memory.py)
for the tiny policy and a 13x larger twin, with and without checkpointing and the chunked head.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepeyes.config import Config, ConfigError, load_config
from deepeyes.hub import cached_snapshot, is_hub_id
from trainer.distributed import use_fsdp2

GIB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FRAMEWORK_GIB = 2.0  # CUDA context, NCCL buffers, allocator slack: an allowance, not a measurement
VLLM_RESERVE_GIB = 2.0  # vLLM's own activations and graphs inside gpu_memory_utilization: an allowance


@dataclass(frozen=True)
class Dims:
    """The sizes of a Qwen2.5-VL checkpoint that memory depends on (its config.json)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    v_depth: int
    v_hidden: int
    v_intermediate: int
    out_hidden: int
    patch: int
    temporal: int
    merge: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "Dims":
        t, v = c.get("text_config", c), c["vision_config"]
        return cls(vocab=t["vocab_size"], hidden=t["hidden_size"], layers=t["num_hidden_layers"],
                   heads=t["num_attention_heads"], kv_heads=t["num_key_value_heads"],
                   intermediate=t["intermediate_size"], v_depth=v["depth"], v_hidden=v["hidden_size"],
                   v_intermediate=v["intermediate_size"], out_hidden=v["out_hidden_size"], patch=v["patch_size"],
                   temporal=v["temporal_patch_size"], merge=v["spatial_merge_size"],
                   tied=bool(c.get("tie_word_embeddings", t.get("tie_word_embeddings", False))))


# Known checkpoints, from their published config.json, so a plan needs no download.
KNOWN = {
    "Qwen/Qwen2.5-VL-7B-Instruct": Dims(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                                        v_depth=32, v_hidden=1280, v_intermediate=3420, out_hidden=3584, patch=14,
                                        temporal=2, merge=2),
}


def model_dims(cfg: Config) -> Dims:
    """The policy's sizes: a known Hub id, else the config.json of its folder (or cached snapshot)."""
    path = cfg.model.path
    if path in KNOWN:
        return KNOWN[path]
    if is_hub_id(path):
        folder = cached_snapshot(path)
        if folder is None:
            raise ConfigError(f"model.path={path}: not a checkpoint the plan knows ({', '.join(KNOWN)}) and not "
                              f"in the Hugging Face cache; download it, or give a folder with its config.json")
    else:
        from deepeyes.policy import resolve_policy_path  # builds the tiny policy on first use: only then

        folder = resolve_policy_path(cfg.model)
    return Dims.from_config(json.loads((Path(folder) / "config.json").read_text()))


def param_counts(d: Dims) -> tuple[int, int, int]:
    """(all parameters, one decoder layer's, the root unit's = all but the decoder layers)."""
    h, kv, i = d.hidden, d.kv_dim, d.intermediate
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # q,k,v (bias), o, MLP, 2 norms
    vh, vi, m2 = d.v_hidden, d.v_intermediate, d.merge ** 2
    vision = (3 * d.temporal * d.patch ** 2 * vh
              + d.v_depth * (2 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + 2 * (vh * vi + vi) + (vi * vh + vh))
              + vh + (vh * m2) ** 2 + vh * m2 + vh * m2 * d.out_hidden + d.out_hidden)
    root = d.vocab * h * (1 if d.tied else 2) + h + vision
    return root + d.layers * layer, layer, root


def activation_bytes(d: Dims, tokens: int, compute: int, checkpointing: bool, chunk: int, grads: float) -> float:
    """Peak bytes of one micro-batch of `tokens` (see the module docstring), gradients included."""
    h = d.hidden
    norm_upcast = 2 * (4 - compute) * h  # RMSNorm works in fp32: its input is upcast when compute is narrower
    layer = compute * (9 * h + 2.5 * d.kv_dim + 4 * d.intermediate) + norm_upcast
    head_rows = min(chunk, tokens) if chunk > 0 else tokens
    head_saved = (compute * h + 8) if chunk > 0 else (8 + (compute if compute < 4 else 0)) * d.vocab
    head_work = head_rows * d.vocab * (8 if chunk <= 0 else 12)  # fp32 gradient and softmax of the logits
    kept = compute * h * d.layers if checkpointing else layer * d.layers
    forward_end = tokens * (kept + head_saved) + head_work
    late_backward = grads + tokens * (layer + (compute * h * d.layers if checkpointing else 0))
    return max(forward_end, late_backward)


@dataclass
class Plan:
    train: list[tuple[str, float]]
    rollout: list[tuple[str, float]]
    gpu_gib: float
    tokens: int
    kv_tokens: float
    sequence: int
    fixes: list[str]

    @property
    def train_gib(self) -> float:
        return sum(v for _, v in self.train)

    @property
    def fits(self) -> bool:
        return not self.fixes


def train_rows(d: Dims, m: int, c: int, share: int, fsdp: bool, tokens: int, checkpointing: bool,
               chunk: int) -> list[tuple[str, float]]:
    """(row, GiB) of one Train worker GPU: master bytes `m`, compute bytes `c`, model states sharded
    over `share` workers, the activations of a `tokens` micro-batch (the framework allowance apart)."""
    total, layer, root = param_counts(d)
    if fsdp:
        copies = (c * (root + 2 * layer) * 2) if c != m or share > 1 else 0  # gathered params and their grads
    else:
        copies = c * total if c != m else 0  # autocast's cast weights
    return [("master weights", m * total / share / GIB), ("gradients", m * total / share / GIB),
            ("AdamW moments", 2 * m * total / share / GIB), ("compute copies (gathered / cast)", copies / GIB),
            (f"activations, {tokens} tokens" + (", checkpointed" if checkpointing else ""),
             activation_bytes(d, tokens, c, checkpointing, chunk, 0.0) / GIB)]


def plan(cfg: Config, gpu_gib: float = 80.0, dims: Dims | None = None) -> Plan:
    d = dims or model_dims(cfg)
    t, r = cfg.trainer, cfg.rollout
    m, c = DTYPE_BYTES[t.master_dtype], DTYPE_BYTES[cfg.model.dtype]
    workers = t.num_workers
    fsdp = use_fsdp2(cfg, workers) if t.parallel != "fsdp2" else True
    share = workers if fsdp else 1
    total = param_counts(d)[0]
    sequence = r.max_prompt_length + r.max_response_length
    tokens = max(t.micro_batch_tokens, sequence)  # a sequence is never split over micro-batches
    train = train_rows(d, m, c, share, fsdp, tokens, t.gradient_checkpointing, t.logit_chunk_tokens)
    train.append(("framework allowance", FRAMEWORK_GIB))
    weights = c * total / max(r.tensor_parallel_size, 1)
    kv_per_token = 2 * d.layers * d.kv_dim * c / max(r.tensor_parallel_size, 1)
    budget = r.gpu_memory_utilization * gpu_gib * GIB
    kv = budget - weights - VLLM_RESERVE_GIB * GIB
    rollout = [("weights (model.dtype)", weights / GIB), ("vLLM allowance", VLLM_RESERVE_GIB),
               ("KV cache", max(kv, 0) / GIB)]
    fixes = []
    if sum(v for _, v in train) > gpu_gib:
        if not t.gradient_checkpointing:
            fixes.append("set trainer.gradient_checkpointing=true")
        if t.logit_chunk_tokens <= 0:
            fixes.append("set trainer.logit_chunk_tokens=2048")
        if not fsdp and workers > 1:
            fixes.append("set trainer.parallel=fsdp2 (shards weights, gradients and moments)")
        fixes.append("raise trainer.num_workers (FSDP2 shards the model states further), or lower "
                     "rollout.max_prompt_length / max_response_length (the longest micro-batch)")
    if kv / kv_per_token < sequence:
        fixes.append(f"the rollout KV cache holds {max(kv, 0) / kv_per_token:.0f} tokens, under one sequence "
                     f"({sequence}): raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size")
    return Plan(train, rollout, gpu_gib, tokens, max(kv, 0) / kv_per_token, sequence, fixes)


def render(p: Plan, cfg: Config) -> str:
    lines = [f"memory plan for {cfg.model.path} on {p.gpu_gib:g} GiB GPUs "
             f"(master {cfg.trainer.master_dtype}, compute {cfg.model.dtype}, {cfg.trainer.num_workers} Train workers)",
             "", "per Train worker GPU:"]
    lines += [f"  {name:<44} {gib:8.2f} GiB" for name, gib in p.train]
    lines += [f"  {'total':<44} {p.train_gib:8.2f} GiB  ({'fits' if p.train_gib <= p.gpu_gib else 'does NOT fit'})",
              "", f"per rollout GPU (gpu_memory_utilization {cfg.rollout.gpu_memory_utilization}):"]
    lines += [f"  {name:<44} {gib:8.2f} GiB" for name, gib in p.rollout]
    lines += [f"  KV cache holds {p.kv_tokens:,.0f} tokens = {p.kv_tokens / p.sequence:.1f} full-length sequences "
              f"of {p.sequence}", ""]
    lines += ["fits" if p.fits else "does not fit: " + "; ".join(p.fixes)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="scenario YAML (default: deploy/configs/tiny-cpu.yaml)")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (default: 80)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        p = plan(cfg, args.gpu_gib)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(render(p, cfg))
    return 0 if p.fits else 1
