"""The Ray Train worker: `train_loop_per_worker` sets a `TrainWorker` up, then runs its steps.

One step, in order (each phase a method, read top to bottom): ROLLOUT (my share of the global
batch, n episodes per prompt; DAPO refill), AHEAD (with trainer.max_staleness > 0 the next step's
prompts go out now), ADVANTAGE and OLD LOG-PROBS, UPDATE (token-mean over the global batch), SYNC
(rank 0 publishes version + 1), METRICS (gathered, rank 0 writes), HEALTH (all ranks stop
together), VALIDATE, CHECKPOINT. The maths of each phase is in trainer/loop.py.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist
from ray import serve
from ray.train import Checkpoint

from deepeyes.config import config_from_dict
from deepeyes.data import ParquetRows, RowStream
from deepeyes.policy import load_policy
from deepeyes.policy_family import zoom_box_scale
from deepeyes.serving import APP_NAMES, DEPLOYMENT_NAMES, actor_threads
from services.rollout.trajectory import Trajectory
from services.rollout.weights import get_or_create_weight_store, publish_weights
from trainer.checkpoint import (STARTUP_FILE, STATE_FILE, STOPPED_FILE, full_optimizer_state, load_masters,
                                load_optimizer_state, save_checkpoint)
from trainer.distributed import all_gather_objects, all_max, all_reduce_grads, all_sum, cpu_state_dict, shard_fsdp2, use_fsdp2, world
from trainer.evaluate import validate
from trainer.grpo import group_advantages, zero_variance_groups
from trainer.loop import (STORE_TIMEOUT_S, RunHealth, behaviour_logprobs, build_examples, logprob_mismatch, lr_factor,
                          total_steps, update)
from trainer.metrics import (MetricsSink, UpdateStats, engine_stamps, episode_summary, latest_stamps,
                             rollout_idle_share, step_metrics, write_trajectories)
from trainer.packing import Example, install_logprob_head
from trainer.precision import (enable_gradient_checkpointing, engine_weights, forward_context, fsdp_mixed_precision,
                               torch_dtype)
from trainer.rollouts import Rollouts, dynamic_sampling

log = logging.getLogger("deepeyes.trainer")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: setup, then ROLLOUT / ADVANTAGE / UPDATE / SYNC per step."""
    worker = TrainWorker(loop_config)
    worker.validate_start()
    for step in range(worker.start_step, worker.steps + 1):
        if not worker.step(step):
            break
    worker.close()


@dataclass
class StepResult:
    """What one step's phases hand each other."""

    mine: list[Any]
    trajs: list[Trajectory]
    rollouts: Rollouts
    dropped_groups: int = 0
    resume_at: Any = None
    advantages: list[float] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    stats: UpdateStats = field(default_factory=UpdateStats)
    mismatch: float = 0.0
    state_dict: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class TrainWorker:
    """One Train worker's run: the policy, its optimizer, the data stream, the handles, the sink."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        t_entry = time.time()
        self.loop_config = loop_config
        cfg = self.cfg = config_from_dict(loop_config["config"])
        self.rank, self.world_size = world()
        logging.basicConfig(level=logging.INFO, format=f"[rank {self.rank}] %(message)s")
        torch.set_num_threads(actor_threads(cfg.trainer.torch_threads))
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.trainer.use_gpu else torch.device("cpu")
        self.run_dir = Path(loop_config["run_dir"])
        torch.manual_seed(cfg.trainer.seed)
        resume_from = self._resume_point()
        self._load_models(resume_from)
        self._open_data_and_handles()
        self.start_step, self.version = 1, 0
        epoch = pos = 0
        if resume_from:
            epoch, pos = self._restore(resume_from)
        self.stream = RowStream(self.train, cfg.trainer.seed, cfg.data.shuffle, cfg.data.shuffle_buffer_rows, epoch, pos)
        self.ahead: tuple[list[Any], Any] | None = None  # the next step's rows and their episodes in flight
        self.engine_seen: dict[str, tuple[float, float]] = {}  # replica -> (wall, engine busy s) last stamped
        self._publish_start()
        # a resumed run redoes the steps after its checkpoint: their old metric rows go
        self.sink = (MetricsSink(self.run_dir, cfg.logging.tensorboard, cfg.logging.ray_metrics,
                                 start_step=self.start_step) if self.rank == 0 else None)
        self.health = RunHealth(cfg)
        self.traj_dir = self.run_dir / "trajectories"
        self.traj_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0 and "t0_wall" in loop_config:  # the start-up, as the driver's summary reports it
            now = time.time()
            (self.run_dir / STARTUP_FILE).write_text(json.dumps({
                "train_workers_s": t_entry - loop_config["fit_wall"], "worker_setup_s": now - t_entry,
                "first_request_s": now - loop_config["t0_wall"]}))

    # ------------------------------------------------------------------ setup
    def _resume_point(self) -> Path | None:
        lc = self.loop_config
        resume_from = Path(lc["resume_from"]) if lc.get("resume_from") else None
        restored = ray.train.get_checkpoint()  # set when Ray Train restarted us after a failure
        if restored is not None:
            resume_from = Path(restored.path)
            log.warning("worker group restarted: resuming from %s", resume_from)
        return resume_from

    def _load_models(self, resume_from: Path | None) -> None:
        cfg, lc = self.cfg, self.loop_config
        # A resumed run starts from the checkpoint's HF export (loaded before any sharding).
        # The masters in trainer.master_dtype; a checkpoint's own masters replace its export's weights.
        self.policy = load_policy(resume_from / "hf" if resume_from else lc["policy_dir"], device=self.device,
                                  dtype=cfg.trainer.master_dtype, min_pixels=cfg.model.min_pixels,
                                  max_pixels=cfg.model.max_pixels, attn_implementation=cfg.model.attn_implementation,
                                  trainable=True)
        if resume_from is not None:
            load_masters(resume_from, self.policy.model)
        self.policy.path = lc["policy_dir"]  # tokenizer/processor files for checkpoint exports
        self.model = self.policy.model
        self.ref_model = None
        if cfg.trainer.kl_coef > 0:  # the reference policy is the run's starting point, not the checkpoint
            self.ref_model = load_policy(lc["policy_dir"], device=self.device, dtype=cfg.model.dtype).model
        if cfg.trainer.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        install_logprob_head(self.model, cfg.trainer.logit_chunk_tokens)
        self.sync_grads = all_reduce_grads
        self.fsdp = use_fsdp2(cfg, self.world_size)
        if self.fsdp:  # FSDP2 reduce-scatters the gradients in backward itself
            shard_fsdp2(self.model, fsdp_mixed_precision(cfg))
            self.sync_grads = lambda m: None  # noqa: E731
        self.autocast = forward_context(cfg, self.device, self.fsdp)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.trainer.lr,
                                           weight_decay=cfg.trainer.weight_decay)

    def _open_data_and_handles(self) -> None:
        cfg, lc = self.cfg, self.loop_config
        # DATA: every worker streams the files itself (metadata now, a row group when the order reaches
        # it); all take the same rows in the same order and keep their share, so refills and resumes agree
        self.train = ParquetRows(lc["train_files"], cfg.data)
        self.steps = total_steps(cfg, len(self.train))
        # validation streams too: validate() reads the first val_rows usable rows in file order, a chunk at a time
        self.val = ParquetRows(lc["val_files"], cfg.data) if lc["val_files"] else None
        self.handle = serve.get_deployment_handle(DEPLOYMENT_NAMES["rollout"], app_name=APP_NAMES["rollout"])
        self.judge_handle = (serve.get_deployment_handle(DEPLOYMENT_NAMES["judge"], app_name=APP_NAMES["judge"])
                             if APP_NAMES["judge"] in serve.status().applications else None)
        self.store = get_or_create_weight_store()

    def _restore(self, resume_from: Path) -> tuple[int, int]:
        """Optimizer, RNG, step and policy version from the checkpoint; returns the data position."""
        state = json.loads((resume_from / STATE_FILE).read_text())
        load_optimizer_state(self.model, self.optimizer, torch.load(resume_from / "optimizer.pt", weights_only=False),
                             self.fsdp)
        rng = torch.load(resume_from / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self.start_step, self.version = state["step"] + 1, state["version"]
        log.info("resumed from %s at step %d (policy version %d)", resume_from, state["step"], self.version)
        return state["sampler"]["epoch"], state["sampler"]["pos"]

    def _publish_start(self) -> None:
        """Replicas may hold other weights than ours (the raw folder of a `serve deploy`ed app, a
        checkpoint's, an earlier job's): publish what we hold now under a version newer than any
        they have seen, and ask for it from the first request on."""
        version = max(self.version, int(ray.get(self.store.version.remote(), timeout=STORE_TIMEOUT_S)) + 1)
        state_dict = cpu_state_dict(self.model)  # a collective under FSDP2: every rank takes part
        if self.rank == 0:
            publish_weights(engine_weights(state_dict, self.cfg), version)
        self.version = int(all_max(version, self.device))

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def validate_start(self) -> None:
        """VALIDATE the starting policy (the SFT warm start): the full validation, as at the end."""
        if self.val is not None and self.cfg.trainer.val_before_train and self.start_step == 1:
            if self.rank == 0:
                self.sink.write(0, validate(self.cfg, self.handle, self.judge_handle, self.val, 0, self.version,
                                            full=True))
            self._barrier()

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> bool:
        """One GRPO step; False when the run must stop (the reason is in the run folder)."""
        t_step = time.perf_counter()
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.trainer.lr * lr_factor(self.cfg, step, self.steps)
        r = self._rollout(step)
        self._learn(step, r)
        self._sync(r)
        r.timings["step"] = time.perf_counter() - t_step
        metrics = self._report(step, r)
        stop = self.health.check(step, self._gathered)  # every rank reads the same counts: all stop together
        if stop:
            if self.rank == 0:
                (self.run_dir / STOPPED_FILE).write_text(json.dumps({"step": step, "reason": stop}))
            log.error("stopping the run at step %d: %s", step, stop)
            return False
        self._validate(step)
        self._checkpoint(step, r, metrics)
        return True

    def _rollout(self, step: int) -> StepResult:
        """ROLLOUT: my share of the global batch, n episodes per prompt, at the current version (or
        submitted during the last update, at most trainer.max_staleness versions old); then AHEAD."""
        cfg, rank, ws = self.cfg, self.rank, self.world_size
        t0 = time.perf_counter()
        rollouts = Rollouts(cfg, self.handle, self.judge_handle, step, self.version,
                            take_rows=lambda k: self.stream.take(k * ws)[rank::ws],
                            max_staleness=cfg.trainer.max_staleness)
        if self.ahead is not None:
            mine, inflight = self.ahead
            trajs = rollouts.collect(inflight)
            self.ahead = None
        else:
            mine = self.stream.take(cfg.trainer.batch_size)[rank::ws]
            trajs = rollouts.run(mine)
        r = StepResult(mine=mine, trajs=trajs, rollouts=rollouts)
        if cfg.trainer.dynamic_sampling:  # DAPO: drop zero-variance groups, refill from the data
            r.trajs, r.dropped_groups = dynamic_sampling(trajs, len(mine), cfg.trainer.max_refill_rounds,
                                                         rollouts.refill, lambda x: all_max(x, self.device))
        r.timings["rollout"] = time.perf_counter() - t0
        # AHEAD (trainer.max_staleness > 0): the next step's prompts go out now, sampled by these
        # weights while the update runs; a checkpoint of this step resumes before them
        r.resume_at = self.stream.state()
        if cfg.trainer.max_staleness > 0 and step < self.steps:
            nxt = self.stream.take(cfg.trainer.batch_size)[rank::ws]
            self.ahead = (nxt, rollouts.submit(nxt, step + 1))
        return r

    def _learn(self, step: int, r: StepResult) -> None:
        """ADVANTAGE, OLD LOG-PROBS and UPDATE."""
        cfg, model = self.cfg, self.model
        # ADVANTAGE: GRPO within each prompt group
        r.advantages = group_advantages([t.reward.score for t in r.trajs], [t.group_id for t in r.trajs])
        r.examples = build_examples(self.policy, r.trajs, r.advantages, cfg.trainer.mask_over_turn, self.device,
                                    self.version)
        # OLD LOG-PROBS: by default from the update's own forward (one update on fresh samples);
        # a separate pass only when asked (trainer.old_logprob_pass=always). The reference
        # policy's, for the KL term, always need their own pass (other weights).
        t0 = time.perf_counter()
        if cfg.trainer.old_logprob_pass == "always":
            model.eval()
            behaviour_logprobs(model, r.examples, cfg.trainer.micro_batch_tokens, cfg.rollout.temperature,
                               self.autocast)
        if self.ref_model is not None:
            refs = [Example(e.input_ids, e.loss_mask, e.advantage, e.pixel_values, e.image_grid_thw, e.positions)
                    for e in r.examples]
            behaviour_logprobs(self.ref_model, refs, cfg.trainer.micro_batch_tokens, cfg.rollout.temperature)
            for e, e_ref in zip(r.examples, refs):
                e.ref_logp = e_ref.old_logp
        r.timings["old_logprob"] = time.perf_counter() - t0
        # UPDATE: token-mean over the global batch's policy tokens
        t0 = time.perf_counter()
        model.train()
        local_tokens = sum(float(e.loss_mask[1:].sum()) for e in r.examples)
        global_tokens = all_sum([local_tokens], self.device)[0]
        if global_tokens == 0:  # nothing to learn from (every group dropped): no step, no decay
            log.warning("step %d: no policy tokens in the batch; optimizer step skipped", step)
        for _ in range(cfg.trainer.updates_per_step if global_tokens > 0 else 0):
            r.stats = update(model, self.optimizer, r.examples, cfg, global_tokens, cfg.rollout.temperature,
                             self.sync_grads, self.autocast)
        r.timings["update"] = time.perf_counter() - t0
        r.mismatch = logprob_mismatch(r.trajs, r.examples)  # old_logp: the separate pass's or the update's

    def _sync(self, r: StepResult) -> None:
        """SYNC: publish version + 1; replicas pull it before the next step's requests."""
        t0 = time.perf_counter()
        r.state_dict = cpu_state_dict(self.model)  # collective under FSDP2: every rank takes part
        if self.rank == 0:
            publish_weights(engine_weights(r.state_dict, self.cfg), self.version + 1)
        self._barrier()
        self.version += 1
        r.timings["publish"] = time.perf_counter() - t0

    def _report(self, step: int, r: StepResult) -> dict[str, float]:
        """METRICS: gather every rank's episode summaries and counts, rank 0 writes."""
        cfg, trajs, rollouts = self.cfg, r.trajs, r.rollouts
        scores, groups = [t.reward.score for t in trajs], [t.group_id for t in trajs]
        self._gathered = gathered = all_gather_objects({
            "trajs": [episode_summary(t) for t in trajs], "failed": rollouts.failed,
            "judge_failures": rollouts.judge_failures, "dropped_groups": r.dropped_groups,
            "stats": r.stats.__dict__, "mismatch": r.mismatch, "tokens": sum(len(t.response_ids) for t in trajs),
            "asked": rollouts.asked, "groups": len(set(groups)),
            "stale_dropped": rollouts.stale_dropped, "staleness": rollouts.staleness, "stamps": engine_stamps(trajs),
            "data_skipped": sum(self.train.skipped.counts.values()),
            "data_epoch": self.stream.epoch + self.stream.pos / len(self.train),
            "flat_groups": len(zero_variance_groups(scores, groups))})
        metrics = step_metrics(gathered, r.timings, self.version, self.optimizer.param_groups[0]["lr"],
                               cfg.trainer.kl_coef > 0)
        stamps = latest_stamps((rep, wall, busy) for g in gathered for rep, (wall, busy) in g["stamps"].items())
        idle = rollout_idle_share(self.engine_seen, stamps)
        if idle is not None:
            metrics["timing/rollout_idle_share"] = idle
        if self.rank == 0:
            self.sink.write(step, metrics)
            self.sink.observe_staleness([x for g in gathered for x in g["staleness"]])
            write_trajectories(self.traj_dir / f"step_{step:06d}.jsonl", trajs, r.advantages,
                               cfg.logging.save_trajectories,
                               lambda ids: self.policy.tokenizer.decode(ids, skip_special_tokens=True),
                               cfg.logging.trajectory_images_kb, zoom_box_scale(cfg))
        return metrics

    def _validate(self, step: int) -> None:
        """VALIDATE: on the held-out split (rank 0 asks, everyone waits)."""
        tc = self.cfg.trainer
        if self.val is None or not (step == self.steps or (tc.test_every and step % tc.test_every == 0)):
            return
        if self.ahead is not None:  # validation asks for the new version: let the episodes ahead finish on theirs
            self.ahead[1].wait()
        if self.rank == 0:
            vm = validate(self.cfg, self.handle, self.judge_handle, self.val, step, self.version,
                          full=step == self.steps)
            self.sink.write(step, vm)  # the driver prints it (a worker's print reached the log twice)
        self._barrier()

    def _checkpoint(self, step: int, r: StepResult, metrics: dict[str, float]) -> None:
        """CHECKPOINT: every save_every steps and at the end; every rank reports (a Train barrier)."""
        tc = self.cfg.trainer
        if not (step == self.steps or (tc.save_every and step % tc.save_every == 0)):
            return
        state = {"step": step, "version": self.version, "sampler": r.resume_at, "steps": self.steps}
        optim_state = full_optimizer_state(self.model, self.optimizer, self.fsdp)  # collective under FSDP2
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                save_checkpoint(Path(tmp), self.policy, r.state_dict, optim_state, state,
                                export_dtype=torch_dtype(tc.export_dtype or self.cfg.model.dtype))
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report({"step": step, "reward/score": metrics["reward/score"]}, checkpoint=ckpt,
                             checkpoint_dir_name=f"step_{step:06d}")

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
