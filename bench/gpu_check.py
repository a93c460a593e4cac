"""One-shot GPU check of the GRPO update at the 7B scale: FSDP2 on one GPU, no Ray, no vLLM.

Written to run ONCE, unattended, on a machine that has torch (CUDA) and transformers but neither
Ray nor vLLM nor a network. It imports only the project's pure-torch update path
(`trainer.packing.pack` / `packed_forward`, `trainer.grpo.clipped_policy_loss`; none of them
imports Ray) and builds everything else itself.

What one run does:
- MODEL: a random-init `Qwen2_5_VLForConditionalGeneration` with the architecture of
  Qwen2.5-VL-7B-Instruct (its config.json values, in bench/gpu_build.py: 8.29e9 parameters,
  0.68e9 of them in the vision tower), bf16, built directly on the device.
- SHARD: `torch.distributed` on one rank (file store on local disk; NCCL on CUDA, gloo on CPU),
  FSDP2 `fully_shard` on every decoder layer and then the root, as trainer/distributed.py does on GPU.
  Should `fully_shard` fail, the run goes on unsharded and says so (`"fsdp2": false`).
- DATA: packed rows of synthetic multi-turn episodes (docs/design.md, "Chat format"):
  system/question text, one high-resolution image, assistant turns (the only loss tokens), tool
  observations with crop images; `pixel_values` + `image_grid_thw` per image, and exactly t*h*w/4
  `<|image_pad|>` tokens per image (checked before every forward).
- UPDATE (the loop of trainer/loop.py `update`): behaviour log-probs by one no-grad forward, then
  per step: packed forward -> token-mean PPO-clip loss (eps 0.2) on fixed per-episode
  advantages -> backward -> grad clip 1.0 -> AdamW (lr 1e-6, wd 0.01).
- PUBLISH: the full-state-dict gather the trainer runs before publishing weights
  (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`), timed.

Cases (7B): 8k and 16k tokens with gradient checkpointing (16k is the headline), then the gather,
then two probes that may run out of memory on one GPU and are reported as such: 32k tokens (the
7B scenario's `trainer.micro_batch_tokens`) with checkpointing, 8k without checkpointing.

Precision and memory (the 7B scenario's): fp32 master weights and AdamW moments, bf16 compute
(FSDP2's MixedPrecisionPolicy; autocast when unsharded), gradient checkpointing, the chunked
log-prob head (trainer.logit_chunk_tokens, 2,048 positions). On one GPU the fp32 states of all 28
layers (133 GB) leave no room for activations, so the 7B mode keeps LAYERS_7B = 12 decoder layers
(`--layers` changes it): every per-layer figure is the full model's; the 4-worker FSDP2 plan of
`python -m trainer plan` shards all 28. Each case reports the plan's estimate for itself
(`plan_gib`); on CUDA the headline's `peak_over_plan` is the measured peak over it.

Figures:
- peak memory: torch.cuda.max_memory_allocated() over the case (reset before it); on CPU the
  process's max RSS instead (`peak_mem_kind` says which);
- tokens/s: packed tokens (text + image pad positions) per second of one step (forward, backward,
  clip, AdamW), median over the timed steps;
- MFU = 6 * N * tokens/s / 989e12, N = all parameters (vision tower included), 989 TFLOP/s = H200
  dense bf16 peak. It counts neither attention FLOPs nor the checkpoint recompute, so it reads
  low against hardware FLOP counters;
- gather: seconds and GiB of the full CPU state dict;
- param_change_frac: share of layer 0's down_proj elements that the case's AdamW steps changed:
  with fp32 masters an lr-1e-6 step moves them all (1.0); bf16 parameters read about 0.02 (the
  step is below bf16's resolution for most weights).

From the repository root (copied to the GPU machine with the repo; bench.runner, which needs Ray,
is not imported):

    python -m bench.gpu_check            # the 7B check on CUDA (about 2-4 minutes on an H200)
    python -m bench.gpu_check --tiny     # small config on CPU with gloo, a few hundred tokens

Prints a table, and ends with ONE line of JSON with the headline figures (also when a case or
the set-up fails: then `"ok": false` and `"error"`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

# Less fragmentation between cases of different lengths; must be set before CUDA initialises.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

# bench.gpu_build first: it puts a PIL stand-in in place where Pillow is missing, before deepeyes loads
from bench.gpu_build import (QWEN25_VL_7B, SHAPE_7B, SHAPE_TINY, TINY, Shape, build_config,  # noqa: E402
                             build_model, compute_context, cut_layers, init_dist, packed_row, pick_attn, plan_gib,
                             set_grad_ckpt, shard)
from trainer.grpo import clipped_policy_loss  # noqa: E402
from trainer.packing import install_logprob_head, packed_forward  # noqa: E402

H200_BF16_PEAK = 989e12  # FLOP/s, dense bf16 (H100/H200 SXM)
CLIP_EPS = 0.2
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-6, 0.01, 1.0  # deploy/configs/deepeyes-7b.yaml
MASTER, COMPUTE = torch.float32, torch.bfloat16  # the 7B scenario: fp32 masters and moments, bf16 compute
LOGIT_CHUNK = {"7b": 2048, "tiny": 128}  # trainer.logit_chunk_tokens (the 7B scenario's; smaller for tiny rows)
LAYERS_7B = 12  # decoder layers on one GPU: fp32 states of all 28 (133 GB) leave no room for activations


@dataclass
class Case:
    name: str
    tokens: int
    grad_ckpt: bool
    probe: bool = False    # allowed to run out of memory (reported, not a failure)


@dataclass
class CaseResult:
    case: Case
    status: str = "skipped"          # ok | oom | error | skipped
    packed_tokens: int = 0
    loss_tokens: int = 0
    images: int = 0
    image_tokens: int = 0
    logprob_fwd_s: float = float("nan")
    step_s: float = float("nan")     # median over timed steps: fwd+bwd+clip+AdamW
    fwd_bwd_s: float = float("nan")
    optim_s: float = float("nan")
    tokens_per_s: float = float("nan")
    mfu: float = float("nan")
    peak_mem_gib: float = float("nan")
    plan_gib: float = float("nan")  # trainer/plan.py's estimate of the same case on this one device
    losses: list[float] = field(default_factory=list)
    loss_on_policy: float = float("nan")  # -mean advantage over loss tokens: the first step's loss (ratio 1)
    grad_norms: list[float] = field(default_factory=list)
    clipfrac: float = float("nan")
    param_change_frac: float = float("nan")  # share of a weight's elements the steps changed
    error: str = ""


# ---------------------------------------------------------------------------------------------
# UPDATE


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (the whole tensor when unsharded)."""
    return t.to_local() if hasattr(t, "to_local") else t


def grad_norm_value(norm: Any) -> float:
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def run_case(model: Any, optimizer: Any, case: Case, args: argparse.Namespace, shape: Shape,
             spec: dict[str, Any], n_params: int, device: torch.device, dtype: torch.dtype,
             deadline: float) -> CaseResult:
    res = CaseResult(case=case)
    set_grad_ckpt(model, case.grad_ckpt)
    res.plan_gib = plan_gib(model, case.tokens, case.grad_ckpt, spec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pk = packed_row(model, case.tokens, shape, spec, seed=case.tokens, dtype=dtype, device=device)
    res.packed_tokens = int(pk.input_ids.numel())
    res.loss_tokens = int(pk.target_mask.sum())
    res.images = int(pk.image_grid_thw.shape[0])
    res.image_tokens = int((pk.input_ids == spec["image_token_id"]).sum())

    # OLD LOG-PROBS: the behaviour policy's, one no-grad forward (trainer: behaviour_logprobs)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), compute_context(model, device):
        old_logp, _ = packed_forward(model, pk)
    sync(device)
    res.logprob_fwd_s = time.perf_counter() - t0
    pk.old_logp = old_logp.detach()
    res.loss_on_policy = float(-(pk.advantages * pk.target_mask).sum()) / max(res.loss_tokens, 1)

    def watched() -> torch.Tensor:  # looked up each time: FSDP2 swaps parameters around forwards
        return local(model.model.language_model.layers[0].mlp.down_proj.weight).detach()

    before = watched().clone()
    steps, fwd_bwd, optim = [], [], []
    clipped = 0.0
    for i in range(args.warmup + args.steps):
        if i >= args.warmup and time.perf_counter() > deadline and steps:
            break  # out of time: keep what was measured
        sync(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with compute_context(model, device):
            logp, ent = packed_forward(model, pk, with_entropy=True)
        parts = clipped_policy_loss(logp, pk.old_logp, pk.advantages, pk.target_mask, CLIP_EPS)
        (parts.pg_loss_sum / max(res.loss_tokens, 1)).backward()  # token-mean over loss tokens
        sync(device)
        t1 = time.perf_counter()
        gn = grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP))
        optimizer.step()
        sync(device)
        t2 = time.perf_counter()
        del logp, ent
        res.losses.append(parts.pg_loss_sum.item() / max(res.loss_tokens, 1))
        res.grad_norms.append(gn)
        clipped = parts.clipped_sum
        if i >= args.warmup:
            steps.append(t2 - t0)
            fwd_bwd.append(t1 - t0)
            optim.append(t2 - t1)
    res.step_s = statistics.median(steps)
    res.fwd_bwd_s = statistics.median(fwd_bwd)
    res.optim_s = statistics.median(optim)
    res.tokens_per_s = res.packed_tokens / res.step_s
    res.mfu = 6 * n_params * res.tokens_per_s / H200_BF16_PEAK
    res.clipfrac = clipped / max(res.loss_tokens, 1)
    res.param_change_frac = float((watched() != before).float().mean())
    del before
    res.peak_mem_gib = peak_mem_gib(device)
    res.status = "ok"
    return res


def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def gather_state_dict(model: Any, device: torch.device) -> tuple[float, float, int]:
    """Seconds, GiB and tensor count of the full CPU state dict (the publish path's gather)."""
    # only the gather needs it; a torch without it fails this block, reported as gather_error
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sync(device)
    t0 = time.perf_counter()
    if dist.is_initialized():
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:  # trainer/distributed.py cpu_state_dict's path without a process group
        sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    sync(device)
    secs = time.perf_counter() - t0
    gib = sum(v.numel() * v.element_size() for v in sd.values()) / 2**30
    n = len(sd)
    off_device = all(v.device.type == "cpu" for v in sd.values())
    del sd
    gc.collect()
    if not off_device:
        raise AssertionError("full state dict has tensors off the CPU despite cpu_offload=True")
    return secs, gib, n


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# REPORT


def fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def print_table(results: list[CaseResult], peak_kind: str) -> None:
    head = (f"{'case':<16}{'status':<8}{'tokens':>8}{'loss_tok':>9}{'imgs':>5}{'img_tok':>8}"
            f"{'logp_fwd_s':>11}{'step_s':>8}{'fwd_bwd_s':>10}{'adamw_s':>8}{'tok/s':>9}{'MFU':>7}"
            f"{'peak_GiB':>9}{'grad_norm':>10}")
    print(f"\npeak memory: {peak_kind}; MFU = 6*N*tokens/s / 989e12")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.case.name:<16}{r.status:<8}{r.packed_tokens:>8}{r.loss_tokens:>9}{r.images:>5}{r.image_tokens:>8}"
              f"{fmt(r.logprob_fwd_s, '.3f'):>11}{fmt(r.step_s, '.3f'):>8}{fmt(r.fwd_bwd_s, '.3f'):>10}"
              f"{fmt(r.optim_s, '.3f'):>8}{fmt(r.tokens_per_s, '.0f'):>9}{fmt(r.mfu, '.3f'):>7}"
              f"{fmt(r.peak_mem_gib, '.1f'):>9}{fmt(r.grad_norms[-1] if r.grad_norms else float('nan'), '.3g'):>10}")
        if r.error:
            print(f"  {r.case.name}: {r.error}")


def sig(x: float, digits: int = 4) -> float | None:
    """x to `digits` significant digits; None when not finite (JSON has no NaN)."""
    return float(f"{x:.{digits}g}") if isinstance(x, (int, float)) and math.isfinite(x) else None


def case_summary(r: CaseResult) -> dict[str, Any]:
    return {"name": r.case.name, "status": r.status, "tokens": r.packed_tokens, "grad_ckpt": r.case.grad_ckpt,
            "step_s": sig(r.step_s), "tokens_per_s": sig(r.tokens_per_s), "mfu": sig(r.mfu),
            "peak_mem_gib": sig(r.peak_mem_gib), "plan_gib": sig(r.plan_gib),
            **({"error": r.error[:200]} if r.error else {})}


# ---------------------------------------------------------------------------------------------
# MAIN


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy config on CPU with gloo (smoke test)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda or cpu")
    p.add_argument("--attn", default="auto",
                   help="auto (flash_attention_2 if flash_attn imports, else sdpa), sdpa, eager, flash_attention_2")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 3; tiny 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per case before the timed ones")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock budget; cases left when it runs out are skipped")
    p.add_argument("--no-probes", action="store_true", help="skip the cases that may run out of memory")
    p.add_argument("--layers", type=int, default=None,
                   help="dry run: cut the text decoder and the vision tower to this many layers (widths kept)")
    p.add_argument("--tokens", default=None,
                   help="dry run: comma-separated packed lengths instead of the built-in cases (checkpointing on)")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 3)
    return args


def plan(args: argparse.Namespace) -> tuple[dict[str, Any], Shape, torch.device, torch.dtype, list[Case], str]:
    """(spec, shape, device, dtype, cases, name of the headline case) for the arguments."""
    spec, shape = (TINY, SHAPE_TINY) if args.tiny else (QWEN25_VL_7B, SHAPE_7B)
    layers = args.layers or (None if args.tiny else LAYERS_7B)
    if layers:
        spec = cut_layers(spec, layers)
    if args.device == "auto":
        device = torch.device("cpu") if args.tiny or not torch.cuda.is_available() else torch.device("cuda", 0)
    else:
        device = torch.device(args.device if args.device != "cuda" else "cuda:0")
    dtype = MASTER  # the masters; compute is bf16 (compute_context)
    if args.tiny:
        cases = [Case("tiny-256", 256, True), Case("tiny-512", 512, True),
                 Case("tiny-256-nockpt", 256, False, probe=True)]
        headline_name = "tiny-512"
    else:
        cases = [Case("8k-ckpt", 8192, True), Case("16k-ckpt", 16384, True),
                 Case("32k-ckpt", 32768, True, probe=True), Case("8k-nockpt", 8192, False, probe=True)]
        headline_name = "16k-ckpt"
    if args.tokens:
        cases = [Case(f"{n}-ckpt", int(n), True) for n in args.tokens.split(",")]
        headline_name = cases[-1].name
    if args.no_probes:
        cases = [c for c in cases if not c.probe]
    return spec, shape, device, dtype, cases, headline_name


def set_up(spec: dict[str, Any], args: argparse.Namespace, device: torch.device, dtype: torch.dtype, store: str,
           summary: dict[str, Any]) -> tuple[Any, Any, int]:
    """Versions, config, process group, model, FSDP2, AdamW (noted in summary); (model, optimizer, params)."""
    import transformers  # inside main's try: a missing or old transformers still ends in the JSON line

    summary["transformers"] = transformers.__version__
    summary["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  device {summary['gpu']}  "
          f"python {platform.python_version()}")
    if int(transformers.__version__.split(".")[0]) < 5:  # the packing path's M-RoPE call is 5.x's
        raise RuntimeError(f"transformers {transformers.__version__}: the project needs >= 5.17 (pyproject.toml)")
    cfg = build_config(spec)
    attn = pick_attn(args.attn, device)
    summary["attn"] = attn
    summary["backend"] = init_dist(device, store)
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype, attn)
    install_logprob_head(model, LOGIT_CHUNK["tiny" if args.tiny else "7b"])
    sync(device)
    summary["build_s"] = sig(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    summary["params"] = n_params
    summary["vision_params"] = n_vision
    print(f"model: {n_params:,} params ({n_vision:,} in the vision tower), {attn}, {summary['dtype']}, "
          f"built in {summary['build_s']} s")
    from torch.distributed.fsdp import MixedPrecisionPolicy  # the guarded run: a torch without it still reports

    fsdp, note = shard(model, device, MixedPrecisionPolicy(param_dtype=COMPUTE, reduce_dtype=torch.float32))
    summary["fsdp2"] = fsdp
    summary["fsdp2_note"] = note
    print(f"fsdp2: {note}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    summary["adamw_state_dtype"] = summary["dtype"]  # torch AdamW keeps states in the param (master) dtype
    summary["compute_dtype"] = str(COMPUTE).replace("torch.", "")
    summary["logit_chunk_tokens"] = model.lm_head.chunk
    return model, optimizer, n_params


def run_cases(model: Any, optimizer: Any, cases: list[Case], args: argparse.Namespace, shape: Shape,
              spec: dict[str, Any], n_params: int, device: torch.device, dtype: torch.dtype, deadline: float,
              summary: dict[str, Any], results: list[CaseResult]) -> None:
    """Each case in turn into results (the gather before the first probe, or after the last case)."""
    gather_done = False
    for case in cases:
        if case.probe and not gather_done:
            summary.update(gather_block(model, device))
            gather_done = True
        if time.perf_counter() > deadline:
            results.append(CaseResult(case=case, status="skipped", error="out of --budget-s"))
            continue
        ckpt = "on" if case.grad_ckpt else "off"
        print(f"case {case.name}: {case.tokens} tokens, grad ckpt {ckpt} ...", flush=True)
        try:
            r = run_case(model, optimizer, case, args, shape, spec, n_params, device, dtype, deadline)
        except torch.cuda.OutOfMemoryError as e:
            r = CaseResult(case=case, status="oom", error=str(e).split("\n")[0][:300])
        except Exception as e:  # noqa: BLE001 -- report and go on to the next case
            traceback.print_exc()
            r = CaseResult(case=case, status="error", error=f"{type(e).__name__}: {e}"[:300])
        results.append(r)
        optimizer.zero_grad(set_to_none=True)
        free(device)
        # a line per case, so a run cut short still shows what it measured
        print(f"case {case.name}: {r.status}, step {fmt(r.step_s, '.3f')} s, {fmt(r.tokens_per_s, '.0f')} tok/s, "
              f"MFU {fmt(r.mfu, '.3f')}, peak {fmt(r.peak_mem_gib, '.1f')} GiB {r.error}", flush=True)
    if not gather_done:
        summary.update(gather_block(model, device))


def headline(results: list[CaseResult], headline_name: str, summary: dict[str, Any]) -> None:
    """The headline case's figures, ok and error into summary."""
    head = next((r for r in results if r.case.name == headline_name and r.status == "ok"), None)
    if head is None:  # fall back to the largest non-probe case that ran
        head = max((r for r in results if r.status == "ok" and not r.case.probe),
                   key=lambda r: r.packed_tokens, default=None)
    required_ok = all(r.status == "ok" for r in results if not r.case.probe)
    if head is not None:
        summary.update({
            "headline_case": head.case.name, "tokens": head.packed_tokens, "loss_tokens": head.loss_tokens,
            "images": head.images, "image_tokens": head.image_tokens, "grad_ckpt": head.case.grad_ckpt,
            "peak_mem_gib": sig(head.peak_mem_gib), "tokens_per_s": sig(head.tokens_per_s),
            "mfu": sig(head.mfu), "step_s": sig(head.step_s), "fwd_bwd_s": sig(head.fwd_bwd_s),
            "adamw_s": sig(head.optim_s), "logprob_fwd_s": sig(head.logprob_fwd_s),
            "loss_first": sig(head.losses[0], 6), "loss_on_policy": sig(head.loss_on_policy, 6),
            "loss": sig(head.losses[-1], 6), "grad_norm": sig(head.grad_norms[-1]), "clipfrac": sig(head.clipfrac),
            "param_change_frac": sig(head.param_change_frac), "plan_gib": sig(head.plan_gib),
            "peak_over_plan": sig(head.peak_mem_gib / head.plan_gib) if device_is_cuda(summary) else None,
        })
    summary["ok"] = bool(head is not None and required_ok and "gather_error" not in summary)
    if not summary["ok"] and "error" not in summary:
        summary["error"] = "; ".join(f"{r.case.name}: {r.status} {r.error}" for r in results
                                     if r.status != "ok" and not r.case.probe) or summary.get("gather_error", "")


def device_is_cuda(summary: dict[str, Any]) -> bool:
    return str(summary.get("device", "")).startswith("cuda")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    spec, shape, device, dtype, cases, headline_name = plan(args)
    peak_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS (CPU run)"
    summary: dict[str, Any] = {
        "ok": False, "mode": "tiny" if args.tiny else "qwen2.5-vl-7b", "device": str(device),
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "mfu_formula": "6*N*tokens_per_s/989e12 (N = all params; no attention FLOPs, no recompute)",
        "peak_mem_kind": peak_kind,
    }
    results: list[CaseResult] = []
    store = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        model, optimizer, n_params = set_up(spec, args, device, dtype, store, summary)
        run_cases(model, optimizer, cases, args, shape, spec, n_params, device, dtype, deadline, summary, results)
        print_table(results, peak_kind)
        headline(results, headline_name, summary)
    except Exception as e:  # noqa: BLE001 -- the JSON line must still come out
        traceback.print_exc()
        summary["error"] = f"{type(e).__name__}: {e}"[:500]
        if results:
            print_table(results, peak_kind)
    finally:
        summary["cases"] = [case_summary(r) for r in results]
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(store, ignore_errors=True)
        print(json.dumps(summary, default=str), flush=True)
    return 0 if summary["ok"] else 1


def gather_block(model: Any, device: torch.device) -> dict[str, Any]:
    print("gather: get_model_state_dict(full_state_dict=True, cpu_offload=True) ...", flush=True)
    try:
        secs, gib, n = gather_state_dict(model, device)
        print(f"gather: {secs:.2f} s for {gib:.2f} GiB in {n} tensors")
        return {"gather_s": sig(secs), "gather_gib": sig(gib), "gather_tensors": n}
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"gather_error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        free(device)


if __name__ == "__main__":
    sys.exit(main())
