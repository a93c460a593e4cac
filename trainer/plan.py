"""`python -m trainer plan`: the GPU memory a config needs, per Train worker GPU and per rollout GPU.

Train worker: the master weights, their gradients and AdamW's two moments (sharded over the workers
under FSDP2), the compute-dtype copies (FSDP2's gathered root unit and two decoder layers, or
autocast's cast weights under DDP), and the activations of the longest micro-batch: the larger of
the forward's end (everything saved for backward, plus the output head's working copies) and late
backward (all gradients, plus one recomputed layer under checkpointing). Rollout GPU: the weights in
model.dtype and the KV cache left at rollout.gpu_memory_utilization.

The policy families: Qwen2.5-VL, Qwen3-VL dense and Qwen3-VL MoE (config.json model_type
qwen2_5_vl, qwen3_vl, qwen3_vl_moe); `param_counts` is exact for each (tests/unit/test_memory_plan.py,
tests/unit/test_plan_qwen3.py: against transformers' own models, the real sizes built on the meta device).

The per-token activation counts were read off the autograd graph of the Qwen2.5-VL decoder (the
tensors saved for backward, by shape): per layer 9 hidden-sized, 4 intermediate-sized and
2.5 KV-sized vectors; at the head 2 fp32 vocabulary-sized ones. tests/unit/test_memory_plan.py
checks the whole estimate against the measured peak of real update steps on CPU (trainer/memory.py)
for the tiny policy and a 13x larger twin, with and without checkpointing and the chunked head.
Qwen3-VL's decoder (`layer_activation_bytes`) is counted exactly, tensor by tensor, from the same
kind of reading; tests/unit/test_plan_qwen3.py checks the count against the bytes one decoder layer
saves (fp32 and bf16) and the whole estimate against measured update peaks on CPU. Two of its
hidden-sized vectors are query-sized (heads x head_dim: twice the hidden size in the 30B-A3B), and
its q/k RMSNorms keep the query and key both as they come and in fp32. A MoE layer keeps, for each
of a token's experts_per_token routed copies, the hidden state twice (gathered in; expert output
before its routing weight) and 4 expert-intermediate vectors (gate and up, SiLU, product), plus
the router's fp32 probabilities over all experts. In its backward the routed copies' gradients
come on top: taken as large again as the saved routed tensors, a rough allowance (without it the
plan sat 18-25% under the measured peak of a checkpointed MoE update on CPU). Its weights,
gradients and AdamW moments count all experts.
Assumptions not measured here: the MoE counts are those of transformers' grouped_mm experts (its
default) read on CPU; another experts kernel on GPU (or expert parallelism, which this trainer does
not use) may keep other tensors. Routing imbalance does not change them: each token has exactly
experts_per_token copies whatever experts they go to.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deepeyes.config import Config, ConfigError, load_config
from deepeyes.hub import cached_snapshot, is_hub_id
from trainer.distributed import use_fsdp2

GIB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FRAMEWORK_GIB = 2.0  # CUDA context, NCCL buffers, allocator slack: an allowance, not a measurement
VLLM_RESERVE_GIB = 2.0  # vLLM's own activations and graphs inside gpu_memory_utilization: an allowance


FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")  # config.json model_type of the policies the plan knows


@dataclass(frozen=True)
class Dims:
    """The sizes of a Qwen2.5-VL or Qwen3-VL (dense or MoE) checkpoint that memory depends on (its config.json)."""

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
    family: str = "qwen2_5_vl"    # one of FAMILIES
    head_dim: int = 0             # 0 = hidden // heads (Qwen2.5-VL); Qwen3-VL states it (128)
    attention_bias: bool = False  # Qwen3-VL: q, k, v, o biases (off in every release); Qwen2.5-VL: q, k, v always
    v_positions: int = 0          # Qwen3-VL: rows of the vision tower's learned position embedding
    deepstack: int = 0            # Qwen3-VL: extra patch mergers, one per deepstack_visual_indexes entry
    experts: int = 0              # MoE: experts per MoE layer (all stored and trained)
    experts_per_token: int = 0    # MoE: experts routed per token (the active ones)
    moe_intermediate: int = 0     # MoE: one expert's intermediate size
    dense_layers: int = 0         # MoE: layers that keep a dense MLP of `intermediate` (mlp_only_layers, sparse step)

    @property
    def qwen3(self) -> bool:
        return self.family != "qwen2_5_vl"

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.hd * self.kv_heads

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "Dims":
        """From a config.json (or a transformers config's to_dict()) of any of FAMILIES."""
        family = c.get("model_type", "qwen2_5_vl")
        if family not in FAMILIES:
            raise ConfigError(f"config.json model_type={family!r}: the memory plan knows {', '.join(FAMILIES)}")
        t, v = c.get("text_config", c), c["vision_config"]
        d = cls(vocab=t["vocab_size"], hidden=t["hidden_size"], layers=t["num_hidden_layers"],
                heads=t["num_attention_heads"], kv_heads=t["num_key_value_heads"],
                intermediate=t["intermediate_size"], v_depth=v["depth"], v_hidden=v["hidden_size"],
                v_intermediate=v["intermediate_size"], out_hidden=v["out_hidden_size"], patch=v["patch_size"],
                temporal=v["temporal_patch_size"], merge=v["spatial_merge_size"],
                tied=bool(c.get("tie_word_embeddings", t.get("tie_word_embeddings", False))))
        if family == "qwen2_5_vl":
            return d
        experts = int(t.get("num_experts", t.get("num_local_experts", 0)) or 0) if family == "qwen3_vl_moe" else 0
        only, step = set(t.get("mlp_only_layers") or ()), int(t.get("decoder_sparse_step", 1) or 1)
        dense = sum(1 for i in range(d.layers) if i in only or (i + 1) % step) if experts else 0
        return replace(d, family=family, head_dim=int(t.get("head_dim") or d.hidden // d.heads),
                       attention_bias=bool(t.get("attention_bias", False)), v_positions=v["num_position_embeddings"],
                       deepstack=len(v.get("deepstack_visual_indexes") or ()), experts=experts,
                       experts_per_token=int(t.get("num_experts_per_tok", 0)) if experts else 0,
                       moe_intermediate=int(t.get("moe_intermediate_size", 0)) if experts else 0, dense_layers=dense)


# Known checkpoints, from their published config.json, so a plan needs no download.
_QWEN3_VISION = dict(v_depth=27, v_hidden=1152, v_intermediate=4304, patch=16, temporal=2, merge=2, v_positions=2304,
                     deepstack=3)  # the 8B's and the 30B-A3B's (the same tower): deepstack at blocks 8, 16, 24
_QWEN3_VL_8B = Dims(vocab=151936, hidden=4096, layers=36, heads=32, kv_heads=8, intermediate=12288, out_hidden=4096,
                    family="qwen3_vl", head_dim=128, **_QWEN3_VISION)
_QWEN3_VL_30B_A3B = Dims(vocab=151936, hidden=2048, layers=48, heads=32, kv_heads=4, intermediate=6144,
                         out_hidden=2048, family="qwen3_vl_moe", head_dim=128, experts=128, experts_per_token=8,
                         moe_intermediate=768, **_QWEN3_VISION)
KNOWN = {
    "Qwen/Qwen2.5-VL-7B-Instruct": Dims(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                                        v_depth=32, v_hidden=1280, v_intermediate=3420, out_hidden=3584, patch=14,
                                        temporal=2, merge=2),
    "Qwen/Qwen3-VL-8B-Instruct": _QWEN3_VL_8B,
    "Qwen/Qwen3-VL-8B-Thinking": _QWEN3_VL_8B,
    "Qwen/Qwen3-VL-30B-A3B-Instruct": _QWEN3_VL_30B_A3B,
    "Qwen/Qwen3-VL-30B-A3B-Thinking": _QWEN3_VL_30B_A3B,
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


def _layer_params(d: Dims) -> tuple[int, int]:
    """(a dense decoder layer's parameters, a MoE layer's: all its experts and the router; 0 if none)."""
    h, kv, i = d.hidden, d.kv_dim, d.intermediate
    if not d.qwen3:
        return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h, 0  # q,k,v (bias), o, MLP, 2 norms
    q = d.q_dim
    attn = 2 * h * q + 2 * h * kv + 2 * d.hd + 2 * h  # q, o, k, v, q/k RMSNorm (head_dim), 2 layer norms
    attn += (q + 2 * kv + h) if d.attention_bias else 0
    moe = attn + d.experts * (3 * h * d.moe_intermediate + h) if d.experts else 0  # fused gate_up, down; router
    return attn + 3 * h * i, moe


def _vision_params(d: Dims) -> int:
    vh, vi, m2, out = d.v_hidden, d.v_intermediate, d.merge ** 2, d.out_hidden
    patch = 3 * d.temporal * d.patch ** 2 * vh
    attn = 2 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh)  # 2 norms' weights, qkv, proj
    merger = (vh * m2) ** 2 + vh * m2 + vh * m2 * out + out  # its 2 linears, with bias
    if not d.qwen3:  # RMSNorms, SwiGLU MLP with bias; merger after an RMSNorm
        return patch + d.v_depth * (attn + 2 * (vh * vi + vi) + (vi * vh + vh)) + vh + merger
    block = attn + 2 * vh + (vh * vi + vi) + (vi * vh + vh)  # LayerNorms (their biases), 2-matrix MLP with bias
    deepstack = d.deepstack * (2 * vh * m2 + merger)  # LayerNorm over the merged width
    return patch + vh + d.v_positions * vh + d.v_depth * block + 2 * vh + merger + deepstack


def param_counts(d: Dims) -> tuple[int, int, int]:
    """(all parameters, the largest decoder layer's, the root unit's = all but the decoder layers).

    A MoE counts every expert: all are stored, get gradients and AdamW moments, and FSDP2 gathers a
    whole layer at a time."""
    dense, moe = _layer_params(d)
    root = d.vocab * d.hidden * (1 if d.tied else 2) + d.hidden + _vision_params(d)
    n_moe = d.moe_layers
    largest = max(dense if n_moe < d.layers else 0, moe if n_moe else 0)
    return root + (d.layers - n_moe) * dense + n_moe * moe, largest, root


def layer_activation_bytes(d: Dims, compute: int) -> tuple[float, float]:
    """Per token: (all decoder layers' saved-for-backward bytes, the most one layer holds in its
    backward: its saved bytes, and for a MoE layer also the gradients of its routed copies, as
    large again as their saved tensors). Where the counts come from: the module docstring."""
    h = d.hidden
    if not d.qwen3:
        norm_upcast = 2 * (4 - compute) * h  # RMSNorm works in fp32: its input is upcast when compute is narrower
        layer = compute * (9 * h + 2.5 * d.kv_dim + 4 * d.intermediate) + norm_upcast
        return layer * d.layers, layer
    q, kv, c = d.q_dim, d.kv_dim, compute
    norms = 2 * (4 * h + 2 * c * h + 4)  # 2 RMSNorms: fp32 input, normed, times weight (+ fp32 rstd)
    qk_norm = (4 + c) * (q + kv) + 4 * (d.heads + d.kv_heads)  # q and k as they come and in fp32 (+ rstd)
    attn = norms + qk_norm + c * (2 * q + 2 * kv + 2 * d.hd) + 4 * d.heads  # rotated q, k; v; out; cos, sin; lse
    dense = attn + c * 4 * d.intermediate
    k = d.experts_per_token
    routed = c * k * (2 * h + 4 * d.moe_intermediate + 1)  # per routed copy: in, out, gate/up/SiLU/product
    router = 4 * d.experts + 36 * k + 4  # fp32 probabilities over all experts, top-k weights, int64 indices
    moe = attn + routed + router
    n_moe = d.moe_layers
    return (d.layers - n_moe) * dense + n_moe * moe, max(dense if n_moe < d.layers else 0,
                                                         moe + routed if n_moe else 0)


def activation_bytes(d: Dims, tokens: int, compute: int, checkpointing: bool, chunk: int, grads: float) -> float:
    """Peak bytes of one micro-batch of `tokens` (see the module docstring), gradients included."""
    h = d.hidden
    layers, layer = layer_activation_bytes(d, compute)
    head_rows = min(chunk, tokens) if chunk > 0 else tokens
    head_saved = (compute * h + 8) if chunk > 0 else (8 + (compute if compute < 4 else 0)) * d.vocab
    head_work = head_rows * d.vocab * (8 if chunk <= 0 else 12)  # fp32 gradient and softmax of the logits
    kept = compute * h * d.layers if checkpointing else layers
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
    family = getattr(cfg.model, "family", "auto")
    if family not in ("auto", d.family):
        raise ConfigError(f"model.family={family} but model.path={cfg.model.path} is a {d.family} checkpoint; "
                          f"set model.family={d.family} (or auto)")
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
    tp = max(r.tensor_parallel_size, 1)
    weights = c * total / tp
    kv_per_token = 2 * d.layers * d.kv_dim * c / min(tp, d.kv_heads)  # vLLM copies KV heads past tp = kv_heads
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
