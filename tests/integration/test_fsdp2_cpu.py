"""FSDP2 on CPU (gloo, 2 processes, no Ray) against the DDP path of the same update.

Each rank builds its own trajectories, as a Train worker does, and runs trainer/loop.py's real
functions (build_examples, behaviour_logprobs, update, cpu_state_dict, full_optimizer_state,
load_optimizer_state) on two copies of the tiny policy: plain modules with `all_reduce_grads`
(DDP) and `shard_fsdp2` modules. The ranks differ on purpose: 4 micro-batches against 3 (FSDP2
pads rank 1 with an idle pass) and an image-free micro-batch on rank 1 (its vision tower gets no
gradient there). The first update must give the same loss, gathered gradients and parameters;
the full model and optimizer state saved on rank 0 and loaded into a freshly sharded model must
round-trip exactly, and a further update after the reload must equal one without it.

Tolerances, from measured max abs diffs (torch 2.13 CPU, 1 thread per rank; the float64 figures
come from a one-off run of the DDP path in float64, not part of this test):
- log-probs: FSDP2's all-gathered weights are the same bits, measured diff 0.0; 1e-5 as in
  test_packing.
- gradients: the two paths sum the same micro-batch x rank terms in another order (DDP: all
  micro-batches, then ranks; FSDP2: ranks per micro-batch). Measured 2.9e-7 with max |g| 3.6e-2
  (8e-6 relative); the float32 DDP result itself is 4.1e-7 (1.2e-5 relative) from float64, FSDP2
  1.3e-7. Bound: 5e-5 relative to max |g|. The bugs it guards against are far larger: FSDP2's
  default mean over ranks halves every gradient (measured diff 1.2e-2, grad norm 0.659 vs 1.319).
- grad norm, step-2 loss (ratio != 1, so it depends on the updated weights): measured 8e-6 and
  1e-7 relative; bound 5e-5 relative.
- parameters after AdamW (lr 1e-3): step 1 moves elements by up to lr; where |g| is near Adam's
  eps the step is sensitive to gradient rounding: measured 1.5e-6 after one and two steps (the
  float32 DDP step itself is 1.05e-5 from float64). Bound: 2e-5 = 2% of lr; a missed or
  misplaced shard update differs by ~lr (1e-3), the default-mean bug by 1e-4.
- reload: the same tensors through the same computation: exact.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from raycli import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WORLD = 2
# per rank: prompt groups of (image size or None, response length per sample); rank 1's text-only
# group packs into one micro-batch without an image, where the vision tower gets no gradient
GROUPS = {
    0: [((300, 200), [17, 25]), ((120, 460), [9, 30])],
    1: [((640, 640), [12, 20]), (None, [40, 33])],
}
REWARDS = [1.0, 0.0]
LR = 1e-3
OVERRIDES = ["trainer.micro_batch_tokens=160", f"trainer.lr={LR}", "trainer.grad_clip=1.0", "trainer.parallel=fsdp2"]


def _trajectories(policy: Any, rank: int) -> list[Any]:
    from deepeyes.chat import CHAT_TEMPLATE
    from deepeyes.policy import encode_text_with_images, process_images, resize_for_model
    from deepeyes.contracts import RewardResult
    from services.rollout.trajectory import Trajectory

    rng = torch.Generator().manual_seed(100 + rank)
    trajs = []
    for g, (size, resp_lens) in enumerate(GROUPS[rank]):
        images = [resize_for_model(Image.new("RGB", size, (60 * g + 40 * rank, 90, 200)), 3136, 50176)] if size else []
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": f"question {rank}-{g}"}]
        text = policy.tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=CHAT_TEMPLATE,
                                                    tokenize=False, add_generation_prompt=True)
        _, grid = process_images(policy, images)
        prompt = encode_text_with_images(policy, text, grid.tolist() if grid is not None else [])
        for k, n in enumerate(resp_lens):
            mask = [1] * n
            mask[3] = 0  # an observation-like hole inside the response
            trajs.append(Trajectory(
                uid=f"{rank}-{g}-{k}", group_id=f"{rank}-{g}", prompt_ids=prompt,
                response_ids=torch.randint(0, 800, (n,), generator=rng).tolist(), loss_mask=mask,
                logprobs=[0.0] * n, images=images, image_grid_thw=grid.tolist() if grid is not None else [],
                response_text="", reward=RewardResult(REWARDS[k], 0.0, 0.0, 0.0)))
    return trajs


def _full_grads(model: Any) -> dict[str, torch.Tensor]:
    """Gradients as full tensors (a collective for DTensor gradients: every rank calls it)."""
    out = {}
    for n, p in model.named_parameters():
        g = p.grad
        if g is not None:
            out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _max_abs(a: dict[str, torch.Tensor]) -> float:
    return max(v.float().abs().max().item() for v in a.values())


def _equal_nested(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_nested(x, y) for x, y in zip(a, b))
    return a == b


def _worker(rank: int, compare: Any, port: int, policy_dir: str, out_dir: str) -> None:
    """One gloo rank running `compare(rank, policy_dir, out_dir)`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        compare(rank, policy_dir, Path(out_dir))
    finally:
        dist.destroy_process_group()


def _compare(rank: int, policy_dir: str, out: Path) -> None:
    from deepeyes.config import load_config
    from deepeyes.policy import load_policy
    from trainer.grpo import group_advantages
    from trainer.checkpoint import full_optimizer_state, load_optimizer_state
    from trainer.distributed import all_reduce_grads, all_sum, cpu_state_dict, shard_fsdp2, use_fsdp2
    from trainer.loop import behaviour_logprobs, build_examples, update
    from trainer.packing import plan_micro_batches

    cfg = load_config(None, OVERRIDES)
    t, temp, cpu = cfg.trainer, cfg.rollout.temperature, torch.device("cpu")
    assert use_fsdp2(cfg, WORLD)

    def setup(fsdp: bool, state: dict[str, torch.Tensor] | None = None) -> tuple[Any, Any, Any]:
        policy = load_policy(policy_dir, trainable=True)
        if state is not None:  # a resumed run loads the checkpoint's weights before sharding
            policy.model.load_state_dict(state)
        if fsdp:
            shard_fsdp2(policy.model)
        return policy, policy.model, torch.optim.AdamW(policy.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)

    def examples(policy: Any, model: Any) -> list[Any]:
        trajs = _trajectories(policy, rank)
        adv = group_advantages([x.reward.score for x in trajs], [x.group_id for x in trajs])
        exs = build_examples(policy, trajs, adv, t.mask_over_turn, cpu)
        model.eval()
        behaviour_logprobs(model, exs, t.micro_batch_tokens, temp)
        model.train()
        return exs

    no_sync = lambda m: None  # noqa: E731
    res: dict[str, Any] = {"rank": rank}

    # step 1 on both paths, from the same weights and the same local examples
    pol_d, model_d, opt_d = setup(False)
    pol_f, model_f, opt_f = setup(True)
    exs_d, exs_f = examples(pol_d, model_d), examples(pol_f, model_f)
    res["micro_batches"] = len(plan_micro_batches([len(e) for e in exs_d], t.micro_batch_tokens))
    res["image_free_micro_batches"] = sum(
        all(exs_d[i].pixel_values is None for i in mb) for mb in plan_micro_batches([len(e) for e in exs_d], t.micro_batch_tokens))
    res["old_logp"] = max((a.old_logp - b.old_logp).abs().max().item() for a, b in zip(exs_d, exs_f))
    local_tokens = sum(float(e.loss_mask[1:].sum()) for e in exs_d)
    global_tokens = all_sum([local_tokens], cpu)[0]
    st_d = update(model_d, opt_d, exs_d, cfg, global_tokens, temp, all_reduce_grads)
    st_f = update(model_f, opt_f, exs_f, cfg, global_tokens, temp, no_sync)
    res["stats1_d"], res["stats1_f"] = st_d.__dict__, st_f.__dict__
    g_d, g_f = _full_grads(model_d), _full_grads(model_f)
    res["grads"], res["grads_scale"], res["num_grads"] = _max_diff(g_d, g_f), _max_abs(g_d), len(g_d)
    res["vision_grad_abs"] = max(v.abs().max().item() for k, v in g_f.items() if k.startswith("model.visual."))

    # checkpoint of the sharded run (full tensors on rank 0), through files as in the loop
    sd_f, osd_f = cpu_state_dict(model_f), full_optimizer_state(model_f, opt_f, True)
    if rank == 0:
        sd_d = cpu_state_dict(model_d)
        res["params1"], res["params_scale"] = _max_diff(sd_d, sd_f), _max_abs(sd_d)
        res["params1_moved"] = _max_diff(sd_d, cpu_state_dict(load_policy(policy_dir).model))
        torch.save({"model": sd_f, "optim": osd_f}, out / "ckpt.pt")
    dist.barrier()
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    _, model_r, opt_r = setup(True, ckpt["model"])
    load_optimizer_state(model_r, opt_r, ckpt["optim"], True)
    sd_r, osd_r = cpu_state_dict(model_r), full_optimizer_state(model_r, opt_r, True)
    if rank == 0:
        res["roundtrip_model"] = _equal_nested(sd_r, ckpt["model"])
        res["roundtrip_optim"] = _equal_nested(osd_r, ckpt["optim"])
        res["optim_state_tensors"] = sum(len(v) for v in osd_r["state"].values())

    # step 2 (ratio != 1 now: old log-probs are from before step 1): reloaded vs not vs DDP
    st2_d = update(model_d, opt_d, exs_d, cfg, global_tokens, temp, all_reduce_grads)
    st2_f = update(model_f, opt_f, exs_f, cfg, global_tokens, temp, no_sync)
    st2_r = update(model_r, opt_r, exs_f, cfg, global_tokens, temp, no_sync)
    res["stats2_d"], res["stats2_f"], res["stats2_r"] = st2_d.__dict__, st2_f.__dict__, st2_r.__dict__
    sd2_f, sd2_r = cpu_state_dict(model_f), cpu_state_dict(model_r)
    if rank == 0:
        res["reload_step_equal"] = _equal_nested(sd2_f, sd2_r)
        res["params2"] = _max_diff(cpu_state_dict(model_d), sd2_f)
    (out / f"rank{rank}.json").write_text(json.dumps(res))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_fsdp2_matches_ddp_and_checkpoints_round_trip(tiny_policy_dir, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_compare, free_port(), str(tiny_policy_dir), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    print(json.dumps([r0, r1], indent=1))
    # the ranks really differ: uneven micro-batch counts, one image-free micro-batch on rank 1
    assert (r0["micro_batches"], r1["micro_batches"]) == (4, 3)
    assert r0["image_free_micro_batches"] == 0 and r1["image_free_micro_batches"] == 1
    assert r1["stats1_f"]["micro_batches"] == 4 and r1["stats1_d"]["micro_batches"] == 3  # one idle pass

    # (a) loss and gathered gradients
    for r in (r0, r1):
        assert r["old_logp"] <= 1e-5
        for step in ("stats1", "stats2"):
            d, f = r[f"{step}_d"], r[f"{step}_f"]
            assert f["tokens"] == d["tokens"] and f["clipped"] == d["clipped"]
            assert _rel(f["pg_loss"], d["pg_loss"]) < 5e-5 and _rel(f["entropy_sum"], d["entropy_sum"]) < 5e-5
            assert _rel(f["grad_norm"], d["grad_norm"]) < 5e-5
    assert r0["stats2_d"]["clipped"] > 0  # step 2 is off-policy: its loss depends on the stepped weights
    assert r0["num_grads"] == 57 and r0["vision_grad_abs"] > 0
    assert r0["grads"] / r0["grads_scale"] < 5e-5
    # (b) parameters after one and after two optimizer steps
    assert r0["params1_moved"] > 0.5 * LR  # the step did move the weights
    assert r0["params1"] < 0.02 * LR and r0["params2"] < 0.02 * LR
    # (c) checkpoint round trip, and a step after the reload equals one without it
    assert r0["roundtrip_model"] and r0["roundtrip_optim"] and r0["optim_state_tensors"] == 3 * 57
    assert r0["reload_step_equal"]
    assert r1["stats2_r"] == r1["stats2_f"] and r0["stats2_r"] == r0["stats2_f"]


# ---------------------------------------------------------------------------------------------
# mixed precision: fp32 masters, bf16 compute (the 7B recipe's settings), FSDP2 against DDP

MIXED = ["trainer.micro_batch_tokens=160", "trainer.grad_clip=1.0", "trainer.parallel=fsdp2",
         "model.dtype=bfloat16", "trainer.master_dtype=float32", "trainer.lr=1e-6"]


def _compare_mixed(rank: int, policy_dir: str, out: Path) -> None:
    from deepeyes.config import load_config
    from deepeyes.policy import load_policy
    from trainer.checkpoint import full_optimizer_state, load_masters, load_optimizer_state, save_checkpoint
    from trainer.distributed import all_reduce_grads, all_sum, cpu_state_dict, shard_fsdp2
    from trainer.grpo import group_advantages
    from trainer.loop import behaviour_logprobs, build_examples, update
    from trainer.precision import engine_weights, forward_context, fsdp_mixed_precision

    cfg = load_config(None, MIXED)
    t, temp, cpu = cfg.trainer, cfg.rollout.temperature, torch.device("cpu")

    def setup(fsdp: bool, folder: str = policy_dir, masters: Path | None = None) -> tuple[Any, Any, Any, Any]:
        policy = load_policy(folder, trainable=True, dtype=t.master_dtype)
        if masters is not None:  # resume: the checkpoint's fp32 masters, not its bf16 export
            assert load_masters(masters, policy.model)
        if fsdp:
            shard_fsdp2(policy.model, fsdp_mixed_precision(cfg))
        opt = torch.optim.AdamW(policy.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        return policy, policy.model, opt, forward_context(cfg, cpu, fsdp)

    def examples(policy: Any, model: Any, autocast: Any) -> list[Any]:
        trajs = _trajectories(policy, rank)
        adv = group_advantages([x.reward.score for x in trajs], [x.group_id for x in trajs])
        exs = build_examples(policy, trajs, adv, t.mask_over_turn, cpu)
        model.eval()
        behaviour_logprobs(model, exs, t.micro_batch_tokens, temp, autocast)
        model.train()
        return exs

    no_sync = lambda m: None  # noqa: E731
    res: dict[str, Any] = {"rank": rank}
    pol_d, model_d, opt_d, ac_d = setup(False)
    pol_f, model_f, opt_f, ac_f = setup(True)
    start = cpu_state_dict(model_d)
    exs_d, exs_f = examples(pol_d, model_d, ac_d), examples(pol_f, model_f, ac_f)
    res["old_logp"] = max((a.old_logp - b.old_logp).abs().max().item() for a, b in zip(exs_d, exs_f))
    global_tokens = all_sum([sum(float(e.loss_mask[1:].sum()) for e in exs_d)], cpu)[0]
    st_d = update(model_d, opt_d, exs_d, cfg, global_tokens, temp, all_reduce_grads, ac_d)
    st_f = update(model_f, opt_f, exs_f, cfg, global_tokens, temp, no_sync, ac_f)
    res["stats1_d"], res["stats1_f"] = st_d.__dict__, st_f.__dict__
    res["master_dtypes"] = sorted({str(p.to_local().dtype if hasattr(p, "to_local") else p.dtype)
                                   for p in model_f.parameters()} | {str(p.dtype) for p in model_d.parameters()})
    g_d, g_f = _full_grads(model_d), _full_grads(model_f)
    res["grads"], res["grads_scale"] = _max_diff(g_d, g_f), _max_abs(g_d)
    sd_d, sd_f = cpu_state_dict(model_d), cpu_state_dict(model_f)
    osd_f = full_optimizer_state(model_f, opt_f, True)
    if rank == 0:
        # both moved by about lr wherever the gradient was not ~0: the fp32 masters kept the step
        res["moved_d"] = sum(int(((sd_d[k] - start[k]).abs() > 0.5 * t.lr).sum()) for k in start)
        res["moved_f"] = sum(int(((sd_f[k] - start[k]).abs() > 0.5 * t.lr).sum()) for k in start)
        res["moved_both"] = sum(int((((sd_d[k] - start[k]).abs() > 0.5 * t.lr)
                                     & ((sd_f[k] - start[k]).abs() > 0.5 * t.lr)).sum()) for k in start)
        res["step_sign_agree"] = sum(int(((sd_d[k] - start[k]).sign() == (sd_f[k] - start[k]).sign())[
            (sd_d[k] - start[k]).abs() > 0.5 * t.lr].sum()) for k in start) / max(res["moved_d"], 1)
        sync = engine_weights(sd_f, cfg)  # what weight sync publishes
        res["sync_dtypes"] = sorted({str(v.dtype) for v in sync.values()})
        res["sync_is_cast_masters"] = all(torch.equal(sync[k], sd_f[k].to(torch.bfloat16)) for k in sd_f)
        save_checkpoint(out / "ckpt", pol_f, sd_f, osd_f, {"step": 1}, export_dtype=torch.bfloat16)
        exported = json.loads((out / "ckpt" / "hf" / "config.json").read_text())
        res["export_dtypes"] = sorted({exported["dtype"], exported["text_config"]["dtype"],
                                       exported["vision_config"]["dtype"]})
    dist.barrier()
    # resume from the checkpoint: masters (not the bf16 export) and the optimizer (only rank 0 held
    # the full state; every rank reads it from the file), then step 2 = the step without a reload
    _, model_r, opt_r, _ = setup(True, str(out / "ckpt" / "hf"), out / "ckpt")  # loads bf16, then the masters
    load_optimizer_state(model_r, opt_r, torch.load(out / "ckpt" / "optimizer.pt", weights_only=False), True)
    sd_r = cpu_state_dict(model_r)
    if rank == 0:
        res["resumed_masters_equal"] = _equal_nested(sd_r, sd_f)
    st2_f = update(model_f, opt_f, exs_f, cfg, global_tokens, temp, no_sync, ac_f)
    st2_r = update(model_r, opt_r, exs_f, cfg, global_tokens, temp, no_sync, ac_f)
    res["stats2_f"], res["stats2_r"] = st2_f.__dict__, st2_r.__dict__
    sd2_f, sd2_r = cpu_state_dict(model_f), cpu_state_dict(model_r)
    if rank == 0:
        res["reload_step_equal"] = _equal_nested(sd2_f, sd2_r)
    # the DDP path likewise: its checkpoint (every rank holds the whole optimizer state), resume, step 2
    if rank == 0:
        save_checkpoint(out / "ckpt_d", pol_d, sd_d, full_optimizer_state(model_d, opt_d, False), {"step": 1},
                        export_dtype=torch.bfloat16)
    dist.barrier()
    _, model_dr, opt_dr, _ = setup(False, str(out / "ckpt_d" / "hf"), out / "ckpt_d")
    load_optimizer_state(model_dr, opt_dr, torch.load(out / "ckpt_d" / "optimizer.pt", weights_only=False), False)
    res["ddp_resumed_masters_equal"] = _equal_nested(cpu_state_dict(model_dr), sd_d)
    st2_d = update(model_d, opt_d, exs_d, cfg, global_tokens, temp, all_reduce_grads, ac_d)
    st2_dr = update(model_dr, opt_dr, exs_d, cfg, global_tokens, temp, all_reduce_grads, ac_d)
    res["ddp_reload_step_equal"] = st2_d.__dict__ == st2_dr.__dict__ and _equal_nested(
        cpu_state_dict(model_d), cpu_state_dict(model_dr))
    (out / f"mixed{rank}.json").write_text(json.dumps(res))


def test_fsdp2_mixed_precision_matches_ddp_autocast_and_resumes_from_fp32_masters(tiny_policy_dir, tmp_path):
    mp.spawn(_worker, args=(_compare_mixed, free_port(), str(tiny_policy_dir), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"mixed{r}.json").read_text()) for r in range(WORLD))
    print(json.dumps([r0, r1], indent=1))
    # Tolerances, measured (torch 2.13 CPU, 1 thread per rank): FSDP2's policy runs the whole forward
    # in bf16 while autocast keeps norms and softmax in fp32, so the two differ by bf16 rounding:
    # old log-probs 3.9e-3, losses 6e-7 relative, grad norms 8e-4, gradients 7e-3 of the largest.
    for r in (r0, r1):
        assert r["old_logp"] < 2e-2
        d, f = r["stats1_d"], r["stats1_f"]
        assert f["tokens"] == d["tokens"] and _rel(f["pg_loss"], d["pg_loss"]) < 1e-3
        assert _rel(f["grad_norm"], d["grad_norm"]) < 1e-2
        assert r["master_dtypes"] == ["torch.float32"]  # both paths keep fp32 masters
    assert r0["grads"] / r0["grads_scale"] < 3e-2
    # at lr 1e-6 both steps moved ~all weights with a gradient (822k of 1.08M) by about lr, the same way
    assert r0["moved_d"] > 0.7 * 1_077_696 and r0["moved_both"] > 0.99 * r0["moved_d"]
    assert r0["step_sign_agree"] > 0.99
    # weight sync publishes the masters cast to the engines' dtype; the export is bf16, named so
    assert r0["sync_dtypes"] == ["torch.bfloat16"] and r0["sync_is_cast_masters"]
    assert r0["export_dtypes"] == ["bfloat16"]
    # resume restores the fp32 masters exactly (not the bf16 export) and steps as if never stopped
    assert r0["resumed_masters_equal"] and r0["reload_step_equal"]
    assert r0["stats2_r"] == r0["stats2_f"] and r1["stats2_r"] == r1["stats2_f"]
    assert all(r["ddp_resumed_masters_equal"] and r["ddp_reload_step_equal"] for r in (r0, r1))
    # Tolerances, measured (torch 2.13 CPU, 1 thread per rank): FSDP2's policy runs the whole forward
    # in bf16 while autocast keeps norms and softmax in fp32, so the two differ by bf16 rounding:
    # old log-probs 3.9e-3, losses 6e-7 relative, grad norms 8e-4, gradients 7e-3 of the largest.
    for r in (r0, r1):
        assert r["old_logp"] < 2e-2
        d, f = r["stats1_d"], r["stats1_f"]
        assert f["tokens"] == d["tokens"] and _rel(f["pg_loss"], d["pg_loss"]) < 1e-3
        assert _rel(f["grad_norm"], d["grad_norm"]) < 1e-2
        assert r["master_dtypes"] == ["torch.float32"]  # both paths keep fp32 masters
    assert r0["grads"] / r0["grads_scale"] < 3e-2
    # at lr 1e-6 both steps moved ~all weights with a gradient (822k of 1.08M) by about lr, the same way
    assert r0["moved_d"] > 0.7 * 1_077_696 and r0["moved_both"] > 0.99 * r0["moved_d"]
    assert r0["step_sign_agree"] > 0.99
    # weight sync publishes the masters cast to the engines' dtype; the export is bf16, named so
    assert r0["sync_dtypes"] == ["torch.bfloat16"] and r0["sync_is_cast_masters"]
    assert r0["export_dtypes"] == ["bfloat16"]
    # resume restores the fp32 masters exactly (not the bf16 export) and steps as if never stopped
    assert r0["resumed_masters_equal"] and r0["reload_step_equal"]
    assert r0["stats2_r"] == r0["stats2_f"] and r1["stats2_r"] == r1["stats2_f"]
    assert all(r["ddp_resumed_masters_equal"] and r["ddp_reload_step_equal"] for r in (r0, r1))
