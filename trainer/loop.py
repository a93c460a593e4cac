"""The GRPO step, as it runs inside each Ray Train worker. Read it top to bottom.

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

import json
import logging
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from deepeyes.config import Config, config_from_dict
from deepeyes.data import ParquetRows, RowStream
from deepeyes.images import image_key
from deepeyes.policy import Policy, load_policy, process_images
from deepeyes.serving import APP_NAMES, DEPLOYMENT_NAMES, actor_threads
from services.rollout.trajectory import Trajectory
from trainer.checkpoint import STARTUP_FILE, STATE_FILE, STOPPED_FILE, full_optimizer_state, load_optimizer_state, save_checkpoint
from trainer.distributed import (all_gather_objects, all_max, all_reduce_grads, all_sum, cpu_state_dict,
                                 shard_fsdp2, use_fsdp2, world)
from trainer.evaluate import validate
from trainer.grpo import clipped_policy_loss, group_advantages, zero_variance_groups
from trainer.metrics import (MetricsSink, UpdateStats, engine_stamps, episode_summary, latest_stamps,
                             rollout_idle_share, step_metrics, write_trajectories)
from trainer.packing import Example, make_example, pack, packed_forward, plan_micro_batches
from trainer.rollouts import Rollouts, dynamic_sampling

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
    from torch.distributed.fsdp import FSDPModule

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
def behaviour_logprobs(model: Any, examples: Sequence[Example], budget: int, temperature: float) -> None:
    """Old log-probs (per token of each example) from a teacher-forced pass, before the update."""
    for batch in lockstep_micro_batches(model, examples, budget):
        lp, _ = packed_forward(model, pack(batch), temperature)
        _store_old_logp(batch, lp)


def update(model: Any, optimizer: Any, examples: Sequence[Example], cfg: Config, global_tokens: float,
           temperature: float, sync_grads: Any) -> UpdateStats:
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
            log.warning("steps %d-%d: every group scored the same for each of its samples, so the update "
                        "had no gradient signal (random-init policies score -0.2 everywhere: start from the "
                        "warm start, model.warm_start=true, on both the rollout app and the trainer)",
                        step - self.flat_steps + 1, step)
        if jc.stop_after_steps and self.failing_steps >= jc.stop_after_steps:
            return (f"the judge failed {failures} of {asked_all} judgments at step {step}, and at least "
                    f"{jc.stop_failure_share:.0%} for {self.failing_steps} steps in a row: check the judge "
                    f"({jc.backend} at {jc.base_url}); judge.stop_after_steps=0 disables this stop")
        return ""


# ---------------------------------------------------------------------------------------------
# the loop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: setup, then ROLLOUT / ADVANTAGE / UPDATE / SYNC per step."""
    import ray
    import ray.train
    from ray import serve
    from ray.train import Checkpoint

    from services.rollout.weights import get_or_create_weight_store, publish_weights

    t_entry = time.time()
    cfg: Config = config_from_dict(loop_config["config"])
    rank, world_size = world()
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    torch.set_num_threads(actor_threads(cfg.trainer.torch_threads))
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.trainer.use_gpu else torch.device("cpu")
    run_dir = Path(loop_config["run_dir"])

    # SETUP
    torch.manual_seed(cfg.trainer.seed)
    resume_from = Path(loop_config["resume_from"]) if loop_config.get("resume_from") else None
    restored = ray.train.get_checkpoint()  # set when Ray Train restarted us after a failure
    if restored is not None:
        resume_from = Path(restored.path)
        log.warning("worker group restarted: resuming from %s", resume_from)
    # A resumed run starts from the checkpoint's HF export (loaded before any sharding).
    policy = load_policy(resume_from / "hf" if resume_from else loop_config["policy_dir"], device=device,
                         dtype=cfg.model.dtype, min_pixels=cfg.model.min_pixels,
                         max_pixels=cfg.model.max_pixels, attn_implementation=cfg.model.attn_implementation,
                         trainable=True)
    policy.path = loop_config["policy_dir"]  # tokenizer/processor files for checkpoint exports
    model = policy.model
    ref_model = None
    if cfg.trainer.kl_coef > 0:  # the reference policy is the run's starting point, not the checkpoint
        ref_model = load_policy(loop_config["policy_dir"], device=device, dtype=cfg.model.dtype).model
    sync_grads = all_reduce_grads
    fsdp = use_fsdp2(cfg, world_size)
    if fsdp:  # FSDP2 reduce-scatters the gradients in backward itself
        shard_fsdp2(model)
        sync_grads = lambda m: None  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)

    # DATA: every worker streams the files itself (metadata now, a row group when the order reaches
    # it); all take the same rows in the same order and keep their share, so refills and resumes agree
    train = ParquetRows(loop_config["train_files"], cfg.data)
    steps = total_steps(cfg, len(train))
    # validation streams too: validate() reads the first val_rows usable rows in file order, a chunk at a time
    val = ParquetRows(loop_config["val_files"], cfg.data) if loop_config["val_files"] else None
    epoch = pos = 0
    handle = serve.get_deployment_handle(DEPLOYMENT_NAMES["rollout"], app_name=APP_NAMES["rollout"])
    judge_handle = (serve.get_deployment_handle(DEPLOYMENT_NAMES["judge"], app_name=APP_NAMES["judge"])
                    if APP_NAMES["judge"] in serve.status().applications else None)
    store = get_or_create_weight_store()
    start_step, version = 1, 0

    # RESUME: optimizer, RNG, data position, step and policy version from the checkpoint
    if resume_from:
        state = json.loads((resume_from / STATE_FILE).read_text())
        load_optimizer_state(model, optimizer, torch.load(resume_from / "optimizer.pt", weights_only=False), fsdp)
        rng = torch.load(resume_from / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        epoch, pos = state["sampler"]["epoch"], state["sampler"]["pos"]
        start_step, version = state["step"] + 1, state["version"]
        log.info("resumed from %s at step %d (policy version %d)", resume_from, state["step"], version)
    stream = RowStream(train, cfg.trainer.seed, cfg.data.shuffle, cfg.data.shuffle_buffer_rows, epoch, pos)
    ahead: tuple[list[Any], Any] | None = None  # the next step's rows and their episodes in flight
    engine_seen: dict[str, tuple[float, float]] = {}  # replica -> (wall, engine busy s) last stamped
    # Replicas may hold other weights than ours (the raw folder of a `serve deploy`ed app, a
    # checkpoint's, an earlier job's): publish what we hold now under a version newer than any
    # they have seen, and ask for it from the first request on.
    version = max(version, int(ray.get(store.version.remote(), timeout=STORE_TIMEOUT_S)) + 1)
    state_dict = cpu_state_dict(model)  # a collective under FSDP2: every rank takes part
    if rank == 0:
        publish_weights(state_dict, version)
    version = int(all_max(version, device))

    # a resumed run redoes the steps after its checkpoint: their old metric rows go
    sink = (MetricsSink(run_dir, cfg.logging.tensorboard, cfg.logging.ray_metrics, start_step=start_step)
            if rank == 0 else None)
    health = RunHealth(cfg)
    traj_dir = run_dir / "trajectories"
    traj_dir.mkdir(parents=True, exist_ok=True)

    if rank == 0 and "t0_wall" in loop_config:  # the start-up, as the driver's summary reports it
        now = time.time()
        (run_dir / STARTUP_FILE).write_text(json.dumps({
            "train_workers_s": t_entry - loop_config["fit_wall"], "worker_setup_s": now - t_entry,
            "first_request_s": now - loop_config["t0_wall"]}))
    # VALIDATE the starting policy (the SFT warm start): the full validation, as at the end
    if val is not None and cfg.trainer.val_before_train and start_step == 1:
        if rank == 0:
            sink.write(0, validate(cfg, handle, judge_handle, val, 0, version, full=True))
        if world_size > 1:
            dist.barrier()
    for step in range(start_step, steps + 1):
        t_step = time.perf_counter()
        timings: dict[str, float] = {}
        for g in optimizer.param_groups:
            g["lr"] = cfg.trainer.lr * lr_factor(cfg, step, steps)

        # ROLLOUT: my share of the global batch, n episodes per prompt, at the current version (or
        # submitted during the last update, at most trainer.max_staleness versions old)
        t0 = time.perf_counter()
        rollouts = Rollouts(cfg, handle, judge_handle, step, version,
                            take_rows=lambda k: stream.take(k * world_size)[rank::world_size],
                            max_staleness=cfg.trainer.max_staleness)
        if ahead is not None:
            mine, inflight = ahead
            trajs = rollouts.collect(inflight)
            ahead = None
        else:
            mine = stream.take(cfg.trainer.batch_size)[rank::world_size]
            trajs = rollouts.run(mine)
        dropped_groups = 0
        if cfg.trainer.dynamic_sampling:  # DAPO: drop zero-variance groups, refill from the data
            trajs, dropped_groups = dynamic_sampling(trajs, len(mine), cfg.trainer.max_refill_rounds,
                                                     rollouts.refill, lambda x: all_max(x, device))
        timings["rollout"] = time.perf_counter() - t0

        # AHEAD (trainer.max_staleness > 0): the next step's prompts go out now, sampled by these
        # weights while the update runs; a checkpoint of this step resumes before them
        resume_at = stream.state()
        if cfg.trainer.max_staleness > 0 and step < steps:
            nxt = stream.take(cfg.trainer.batch_size)[rank::world_size]
            ahead = (nxt, rollouts.submit(nxt, step + 1))

        # ADVANTAGE: GRPO within each prompt group
        advantages = group_advantages([t.reward.score for t in trajs], [t.group_id for t in trajs])
        examples = build_examples(policy, trajs, advantages, cfg.trainer.mask_over_turn, device, version)
        # OLD LOG-PROBS: by default from the update's own forward (one update on fresh samples);
        # a separate pass only when asked (trainer.old_logprob_pass=always). The reference
        # policy's, for the KL term, always need their own pass (other weights).
        t0 = time.perf_counter()
        if cfg.trainer.old_logprob_pass == "always":
            model.eval()
            behaviour_logprobs(model, examples, cfg.trainer.micro_batch_tokens, cfg.rollout.temperature)
        if ref_model is not None:
            refs = [Example(e.input_ids, e.loss_mask, e.advantage, e.pixel_values, e.image_grid_thw, e.positions)
                    for e in examples]
            behaviour_logprobs(ref_model, refs, cfg.trainer.micro_batch_tokens, cfg.rollout.temperature)
            for e, e_ref in zip(examples, refs):
                e.ref_logp = e_ref.old_logp
        timings["old_logprob"] = time.perf_counter() - t0

        # UPDATE: token-mean over the global batch's policy tokens
        t0 = time.perf_counter()
        model.train()
        local_tokens = sum(float(e.loss_mask[1:].sum()) for e in examples)
        global_tokens = all_sum([local_tokens], device)[0]
        stats = UpdateStats()
        if global_tokens == 0:  # nothing to learn from (every group dropped): no step, no decay
            log.warning("step %d: no policy tokens in the batch; optimizer step skipped", step)
        for _ in range(cfg.trainer.updates_per_step if global_tokens > 0 else 0):
            stats = update(model, optimizer, examples, cfg, global_tokens, cfg.rollout.temperature, sync_grads)
        timings["update"] = time.perf_counter() - t0
        mismatch = logprob_mismatch(trajs, examples)  # old_logp: the separate pass's or the update's

        # SYNC: publish version + 1; replicas pull it before the next step's requests
        t0 = time.perf_counter()
        state_dict = cpu_state_dict(model)  # collective under FSDP2: every rank takes part
        if rank == 0:
            publish_weights(state_dict, version + 1)
        if world_size > 1:
            dist.barrier()
        version += 1
        timings["publish"] = time.perf_counter() - t0
        timings["step"] = time.perf_counter() - t_step

        # METRICS: gather every rank's episode summaries and counts, rank 0 writes
        gathered = all_gather_objects({
            "trajs": [episode_summary(t) for t in trajs], "failed": rollouts.failed,
            "judge_failures": rollouts.judge_failures, "dropped_groups": dropped_groups,
            "stats": stats.__dict__, "mismatch": mismatch, "tokens": sum(len(t.response_ids) for t in trajs),
            "asked": rollouts.asked, "groups": len({t.group_id for t in trajs}),
            "stale_dropped": rollouts.stale_dropped, "staleness": rollouts.staleness, "stamps": engine_stamps(trajs),
            "data_skipped": sum(train.skipped.counts.values()), "data_epoch": stream.epoch + stream.pos / len(train),
            "flat_groups": len(zero_variance_groups([t.reward.score for t in trajs], [t.group_id for t in trajs]))})
        metrics = step_metrics(gathered, timings, version, optimizer.param_groups[0]["lr"], cfg.trainer.kl_coef > 0)
        stamps = latest_stamps((r, wall, busy) for g in gathered for r, (wall, busy) in g["stamps"].items())
        idle = rollout_idle_share(engine_seen, stamps)
        if idle is not None:
            metrics["timing/rollout_idle_share"] = idle
        if rank == 0:
            sink.write(step, metrics)
            sink.observe_staleness([x for g in gathered for x in g["staleness"]])
            write_trajectories(traj_dir / f"step_{step:06d}.jsonl", trajs, advantages, cfg.logging.save_trajectories,
                               lambda ids: policy.tokenizer.decode(ids, skip_special_tokens=True),
                               cfg.logging.trajectory_images_kb)
        # HEALTH: every rank reads the same gathered counts, so all stop together
        stop = health.check(step, gathered)
        if stop:
            if rank == 0:
                (run_dir / STOPPED_FILE).write_text(json.dumps({"step": step, "reason": stop}))
            log.error("stopping the run at step %d: %s", step, stop)
            break

        # VALIDATE: on the held-out split (rank 0 asks, everyone waits)
        if val is not None and (step == steps or (cfg.trainer.test_every and step % cfg.trainer.test_every == 0)):
            if ahead is not None:  # validation asks for the new version: let the episodes ahead finish on theirs
                ahead[1].wait()
            if rank == 0:
                vm = validate(cfg, handle, judge_handle, val, step, version, full=step == steps)
                sink.write(step, vm)  # the driver prints it (a worker's print reached the log twice)
            if world_size > 1:
                dist.barrier()

        # CHECKPOINT: every save_every steps and at the end; every rank reports (a Train barrier)
        if step == steps or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
            state = {"step": step, "version": version, "sampler": resume_at, "steps": steps}
            optim_state = full_optimizer_state(model, optimizer, fsdp)  # collective under FSDP2
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_checkpoint(Path(tmp), policy, state_dict, optim_state, state)
                    ckpt = Checkpoint.from_directory(tmp)
                ray.train.report({"step": step, "reward/score": metrics["reward/score"]}, checkpoint=ckpt,
                                 checkpoint_dir_name=f"step_{step:06d}")
    if sink is not None:
        sink.close()
