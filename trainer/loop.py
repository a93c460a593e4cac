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
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from deepeyes.config import Config, config_from_dict
from deepeyes.policy import Policy, load_policy, process_images, resize_for_model
from services.judge.reward import RewardResult, ScoreRequest
from services.rollout.trajectory import Trajectory
from services.rollout.types import EpisodeRequest
from trainer.grpo import clipped_policy_loss, group_advantages, zero_variance_groups
from trainer.metrics import MetricsSink, episode_summary, trajectory_metrics
from trainer.packing import Example, make_example, pack, packed_forward, plan_micro_batches

log = logging.getLogger("deepeyes.trainer")
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------
# data order


@dataclass
class PromptSampler:
    """Seeded epoch-wise permutation of row indices; its state (epoch, pos) is checkpointed."""

    num_rows: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    pos: int = 0

    def _order(self, epoch: int) -> list[int]:
        idx = list(range(self.num_rows))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
        return idx

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order(self.epoch)
            need = k - len(out)
            out += order[self.pos:self.pos + need]
            self.pos += need
            if self.pos >= self.num_rows:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}


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
# rollout requests


def episode_requests(cfg: Config, rows: Sequence[Any], row_ids: Sequence[int], step: int, version: int,
                     n: int, greedy: bool = False, tag: str = "s") -> list[EpisodeRequest]:
    """n requests per prompt; images are sent already in the model frame (the crop tool's frame)."""
    reqs = []
    for rid in row_ids:
        row = rows[rid]
        originals = row.images
        frames = [resize_for_model(im, cfg.model.min_pixels, cfg.model.max_pixels) for im in originals]
        # target_bbox is in the stored image's pixels (before any upscale of tiny images)
        extra = dict(row.extra, orig_size=list(row.image_sizes[0]) if row.image_sizes else None)
        for k in range(n):
            reqs.append(EpisodeRequest(
                uid=f"{tag}{step}-{row.index}-{k}", group_id=f"{tag}{step}-{row.index}",
                messages=row.messages, images=frames, ground_truth=row.ground_truth,
                question=row.question, data_source=row.data_source, extra=extra,
                min_version=version, greedy=greedy,
                seed=(cfg.rollout.seed * 1_000_003 + step * 10_007 + rid * 101 + k) % (2**31)))
    return reqs


def run_episodes(handle: Any, reqs: Sequence[EpisodeRequest], timeout_s: float = 1800.0) -> tuple[list[Trajectory], int]:
    """All requests in flight at once; one retry per failed episode; returns (trajectories, failed)."""
    pending = [(r, handle.run_episode.remote(r)) for r in reqs]
    out: list[Trajectory] = []
    failed = 0
    retry = []
    for req, resp in pending:
        try:
            out.append(resp.result(timeout_s=timeout_s))
        except Exception as e:  # a replica died or the episode raised: retry once, then count it
            log.warning("episode %s failed (%s: %s); retrying once", req.uid, type(e).__name__, e)
            retry.append((req, handle.run_episode.remote(req)))
    for req, resp in retry:
        try:
            out.append(resp.result(timeout_s=timeout_s))
        except Exception as e:
            log.error("episode %s failed twice (%s: %s); dropped", req.uid, type(e).__name__, e)
            failed += 1
    return out, failed


def apply_judge_failures(cfg: Config, trajs: list[Trajectory]) -> tuple[list[Trajectory], int]:
    """judge.failure_policy for failed judgments: fail the step, drop the sample, or rule-score it."""
    from services.judge.scoring import apply_failure_policy

    kept, failures = [], 0
    for t in trajs:
        if t.reward.get("judge_ok", True):
            kept.append(t)
            continue
        failures += 1
        req = ScoreRequest(response_text=t.response_text, question=t.question, ground_truth=t.ground_truth,
                           data_source=t.data_source, tool_calls=sum(1 for c in t.tool_calls if c.executed),
                           crops=t.crops_returned)
        result = RewardResult(**{k: v for k, v in t.reward.items() if k in RewardResult.__dataclass_fields__})
        fixed = apply_failure_policy(result, req, cfg.judge)
        if fixed is not None:
            t.reward = dict(t.reward, **fixed.to_dict())
            kept.append(t)
    return kept, failures


def dynamic_sampling(trajs: list[Trajectory], groups_wanted: int, max_rounds: int,
                     more_episodes: Any, global_max: Any = float) -> tuple[list[Trajectory], int]:
    """DAPO: drop groups whose rewards are all equal (no gradient) and refill with new prompts.

    `more_episodes(rows_to_take, groups_needed, round)` takes `rows_to_take` prompts from the
    shared data order and rolls out `groups_needed` of them. Every worker runs the same rounds
    and takes the same number of rows (`global_max` = an all-reduce MAX), so the data order stays
    identical on all workers. Returns the kept trajectories and how many groups were dropped.
    """
    dropped = 0
    for round_ in range(max_rounds + 1):
        flat = zero_variance_groups([t.reward["score"] for t in trajs], [t.group_id for t in trajs])
        dropped += len(flat)
        trajs = [t for t in trajs if t.group_id not in flat]
        missing = max(0, groups_wanted - len({t.group_id for t in trajs}))
        most = int(global_max(missing))
        if most == 0 or round_ == max_rounds:
            break
        trajs = trajs + more_episodes(most, missing, round_)
    return trajs, dropped


# ---------------------------------------------------------------------------------------------
# distributed helpers (gloo on CPU, NCCL on GPU)


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


def shard_fsdp2(model: Any) -> None:
    """FSDP2 (gloo on CPU, NCCL on GPU): one unit per decoder layer; the root unit holds the rest.

    The vision tower stays in the root unit: a unit of its own would all-gather only on ranks
    whose micro-batch has images, and the ranks' collectives would no longer pair up. Gradients
    are summed, not averaged, over ranks (the loss is already divided by the global token count,
    like `all_reduce_grads`), and parameters unused on a rank (no image) reduce as zeros.
    Every rank must run the same number of forward/backward passes (micro-batches).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in model.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM/AVG)
    model.set_reduce_scatter_unused_params(True)


# ---------------------------------------------------------------------------------------------
# the update


def build_examples(policy: Policy, trajs: Sequence[Trajectory], advantages: Sequence[float],
                   mask_over_turn: bool, device: torch.device) -> list[Example]:
    exs = []
    for t, a in zip(trajs, advantages):
        pv, grid = process_images(policy, t.images)
        mask = [0] * len(t.prompt_ids) + list(t.loss_mask)
        if mask_over_turn and t.finish_reason == "turn_cap":
            mask = [0] * len(mask)
        ex = make_example(policy.model, t.input_ids, mask, a,
                          pv.to(device) if pv is not None else None,
                          grid.to(device) if grid is not None else None)
        ex.input_ids, ex.loss_mask, ex.positions = ex.input_ids.to(device), ex.loss_mask.to(device), ex.positions.to(device)
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


@torch.no_grad()
def behaviour_logprobs(model: Any, examples: Sequence[Example], budget: int, temperature: float) -> None:
    """Old log-probs (per token of each example) from a teacher-forced pass, before the update."""
    for batch in lockstep_micro_batches(model, examples, budget):
        lp, _ = packed_forward(model, pack(batch), temperature)
        offset = 0
        for e in batch:
            n = len(e)
            # position t predicts token t+1: store as a per-token log-prob of token t
            e.old_logp = torch.cat([lp.new_zeros(1), lp[offset:offset + n - 1]])
            offset += n


@dataclass
class UpdateStats:
    pg_loss: float = 0.0
    entropy_sum: float = 0.0
    clipped: float = 0.0
    tokens: float = 0.0
    grad_norm: float = 0.0
    kl_sum: float = 0.0
    micro_batches: int = 0


def update(model: Any, optimizer: Any, examples: Sequence[Example], cfg: Config, global_tokens: float,
           temperature: float, sync_grads: Any) -> UpdateStats:
    """One optimizer step over the local examples; loss normalised by the global token count."""
    t = cfg.trainer
    st = UpdateStats()
    optimizer.zero_grad(set_to_none=True)
    for batch in lockstep_micro_batches(model, examples, t.micro_batch_tokens):
        pk = pack(batch)
        logp, ent = packed_forward(model, pk, temperature, with_entropy=True)
        parts = clipped_policy_loss(logp, pk.old_logp, pk.advantages, pk.target_mask, t.clip_eps,
                                    t.clip_eps_high, pk.ref_logp)
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


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(folder: Path, policy: Policy, model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any], state: dict[str, Any]) -> None:
    """Model (HF format under hf/, loadable by from_pretrained and vLLM), optimizer, trainer state."""
    hf = folder / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(hf, state_dict=model_state)
    src = Path(policy.path)
    for f in src.iterdir():  # tokenizer, processor, template: everything but the weights
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "generation_config.json"):
            (hf / f.name).write_bytes(f.read_bytes())
    torch.save(optim_state, folder / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save(rng, folder / "rng.pt")
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def full_optimizer_state(model: Any, optimizer: Any, fsdp: bool) -> dict[str, Any]:
    """The optimizer state as one full (unsharded, CPU) dict; under FSDP2 a collective whose result
    only rank 0 holds (other ranks get an empty dict)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any], fsdp: bool) -> None:
    """Load a `full_optimizer_state` dict; under FSDP2 every rank passes the full dict (a collective)."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint folder with the highest step under run_dir/train (Ray Train's storage)."""
    found = []
    for p in Path(run_dir, "train").glob("step_*"):
        if (p / STATE_FILE).exists():
            found.append((json.loads((p / STATE_FILE).read_text())["step"], p))
    return max(found)[1] if found else None


# ---------------------------------------------------------------------------------------------
# the loop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: setup, then ROLLOUT / ADVANTAGE / UPDATE / SYNC per step."""
    import ray.train
    from ray import serve
    from ray.train import Checkpoint

    from services.rollout.weights import get_or_create_weight_store, publish_weights

    cfg: Config = config_from_dict(loop_config["config"])
    rank, world_size = world()
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    torch.set_num_threads(cfg.trainer.torch_threads)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.trainer.use_gpu else torch.device("cpu")
    run_dir = Path(loop_config["run_dir"])

    # SETUP
    torch.manual_seed(cfg.trainer.seed)
    resume_from = Path(loop_config["resume_from"]) if loop_config.get("resume_from") else None
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

    data = ray.get(loop_config["data"][0])  # read and validated once by the driver
    train, val = data["train"], data["val"]
    steps = total_steps(cfg, len(train))
    sampler = PromptSampler(len(train), cfg.trainer.seed, cfg.data.shuffle)
    handle = serve.get_deployment_handle("RolloutWorker", app_name="rollout")
    store = get_or_create_weight_store()
    start_step, version = 1, 0

    # RESUME: optimizer, RNG, data position, step and policy version from the checkpoint
    if resume_from:
        state = json.loads((resume_from / STATE_FILE).read_text())
        load_optimizer_state(model, optimizer, torch.load(resume_from / "optimizer.pt", weights_only=False), fsdp)
        rng = torch.load(resume_from / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        sampler.epoch, sampler.pos = state["sampler"]["epoch"], state["sampler"]["pos"]
        start_step, version = state["step"] + 1, state["version"]
        log.info("resumed from %s at step %d (policy version %d)", resume_from, state["step"], version)
    # Replicas may hold other weights than ours (the raw folder of a `serve deploy`ed app, a
    # checkpoint's, an earlier job's): publish what we hold now under a version newer than any
    # they have seen, and ask for it from the first request on.
    version = max(version, store_version(store) + 1)
    state_dict = cpu_state_dict(model)  # a collective under FSDP2: every rank takes part
    if rank == 0:
        publish_weights(state_dict, version)
    version = int(all_max(version, device))

    sink = MetricsSink(run_dir, cfg.logging.tensorboard, cfg.logging.ray_metrics) if rank == 0 else None
    traj_dir = run_dir / "trajectories"
    traj_dir.mkdir(parents=True, exist_ok=True)
    t_run = time.perf_counter()

    for step in range(start_step, steps + 1):
        t_step = time.perf_counter()
        timings: dict[str, float] = {}
        for g in optimizer.param_groups:
            g["lr"] = cfg.trainer.lr * lr_factor(cfg, step, steps)

        # ROLLOUT: my share of the global batch, n episodes per prompt, at the current version
        t0 = time.perf_counter()
        batch = sampler.take(cfg.trainer.batch_size)
        mine = batch[rank::world_size]
        trajs, failed = run_episodes(handle, episode_requests(cfg, train.rows, mine, step, version, cfg.rollout.n))
        trajs, judge_failures = apply_judge_failures(cfg, trajs)
        dropped_groups = 0
        if cfg.trainer.dynamic_sampling:  # DAPO: drop zero-variance groups, refill from the data
            def more_episodes(take: int, groups_needed: int, round_: int) -> list[Trajectory]:
                nonlocal failed, judge_failures
                rows_ = sampler.take(take * world_size)[rank::world_size][:groups_needed]
                extra, f2 = run_episodes(handle, episode_requests(cfg, train.rows, rows_, step, version,
                                                                  cfg.rollout.n, tag=f"r{round_}s"))
                extra, jf2 = apply_judge_failures(cfg, extra)
                failed, judge_failures = failed + f2, judge_failures + jf2
                return extra

            trajs, dropped_groups = dynamic_sampling(trajs, len(mine), cfg.trainer.max_refill_rounds, more_episodes,
                                                     lambda x: all_max(x, device))
        timings["rollout"] = time.perf_counter() - t0

        # ADVANTAGE: GRPO within each prompt group
        advantages = group_advantages([t.reward["score"] for t in trajs], [t.group_id for t in trajs])
        examples = build_examples(policy, trajs, advantages, cfg.trainer.mask_over_turn, device)
        t0 = time.perf_counter()
        model.eval()
        behaviour_logprobs(model, examples, cfg.trainer.micro_batch_tokens, cfg.rollout.temperature)
        if ref_model is not None:
            for e in examples:
                e_ref = Example(e.input_ids, e.loss_mask, e.advantage, e.pixel_values, e.image_grid_thw, e.positions)
                behaviour_logprobs(ref_model, [e_ref], cfg.trainer.micro_batch_tokens, cfg.rollout.temperature)
                e.ref_logp = e_ref.old_logp
        timings["old_logprob"] = time.perf_counter() - t0
        mismatch = logprob_mismatch(trajs, examples)

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

        # METRICS: gather every rank's trajectories' summaries, rank 0 writes
        gathered = all_gather_objects({
            "trajs": [episode_summary(t) for t in trajs], "failed": failed, "judge_failures": judge_failures,
            "dropped_groups": dropped_groups, "stats": stats.__dict__, "mismatch": mismatch,
            "tokens": sum(len(t.response_ids) for t in trajs)})
        metrics = step_metrics(cfg, gathered, timings, version, optimizer, stats_world(gathered))
        if rank == 0:
            sink.write(step, metrics)
            write_trajectories(traj_dir / f"step_{step:06d}.jsonl", trajs[: cfg.logging.save_trajectories])
        if rank == 0 and not cfg.logging.progress:  # with progress on, the driver draws a bar instead
            eta = (time.perf_counter() - t_run) / (step - start_step + 1) * (steps - step)
            print(f"step {step}/{steps} score={metrics['reward/score']:.3f} acc={metrics['reward/acc']:.2f} "
                  f"tool_calls={metrics['rollout/tool_calls']:.2f} turns={metrics['rollout/num_turns']:.2f} "
                  f"step_s={timings['step']:.1f} eta_s={eta:.0f}", flush=True)

        # VALIDATE: greedy episodes on the held-out split (rank 0 asks, everyone waits)
        if val is not None and (step == steps or (cfg.trainer.test_every and step % cfg.trainer.test_every == 0)):
            if rank == 0:
                vm = validate(cfg, handle, val, step, version)
                sink.write(step, vm)
                print(f"validation at step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in vm.items()), flush=True)
            if world_size > 1:
                dist.barrier()

        # CHECKPOINT: every save_every steps and at the end; every rank reports (a Train barrier)
        if step == steps or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
            state = {"step": step, "version": version, "sampler": sampler.state(), "steps": steps}
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


def store_version(store: Any) -> int:
    import ray

    return int(ray.get(store.version.remote()))


def cpu_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Full CPU state dict; under FSDP2 gathered from the shards onto rank 0 only (others get {})."""
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if dist.is_initialized() and any(type(p).__name__ == "DTensor" for p in model.parameters()):
            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    except ImportError:
        pass
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def logprob_mismatch(trajs: Sequence[Trajectory], examples: Sequence[Example]) -> float:
    """Max |sampling log-prob - teacher-forced log-prob| over policy tokens (engine/trainer agreement)."""
    worst = 0.0
    for t, e in zip(trajs, examples):
        p = len(t.prompt_ids)
        resp_lp = e.old_logp[p:].detach().cpu()
        sampled = torch.tensor(t.logprobs, dtype=resp_lp.dtype)
        m = torch.tensor(t.loss_mask, dtype=torch.bool)
        if m.any():
            worst = max(worst, float((resp_lp[m] - sampled[m]).abs().max()))
    return worst


def stats_world(gathered: list[dict[str, Any]]) -> UpdateStats:
    total = UpdateStats()
    for g in gathered:
        s = g["stats"]
        for k in ("pg_loss", "entropy_sum", "clipped", "tokens", "kl_sum"):
            setattr(total, k, getattr(total, k) + s[k])
        total.grad_norm = s["grad_norm"]  # identical on every rank after the all-reduce
    return total


def step_metrics(cfg: Config, gathered: list[dict[str, Any]], timings: dict[str, float], version: int,
                 optimizer: Any, st: UpdateStats) -> dict[str, float]:
    episodes = [d for g in gathered for d in g["trajs"]]
    m = trajectory_metrics(episodes)
    m["judge/failures"] = float(sum(g["judge_failures"] for g in gathered))
    tok = max(st.tokens, 1.0)
    m.update({
        "actor/pg_loss": st.pg_loss / tok, "actor/entropy": st.entropy_sum / tok,
        "actor/clipfrac": st.clipped / tok, "actor/grad_norm": st.grad_norm,
        "actor/lr": optimizer.param_groups[0]["lr"],
        "sync/seconds": timings["publish"], "sync/version": float(version),
        "rollout/failed_episodes": float(sum(g["failed"] for g in gathered)),
        "rollout/dropped_groups": float(sum(g["dropped_groups"] for g in gathered)),
        "rollout/logprob_mismatch": max(g["mismatch"] for g in gathered),
        "rollout/episodes": float(len(episodes)),
        "perf/tokens_per_s": sum(g["tokens"] for g in gathered) / max(timings["rollout"], 1e-9),
    })
    if cfg.trainer.kl_coef > 0:
        m["actor/kl"] = st.kl_sum / tok
    for phase, seconds in timings.items():
        m[f"timing/{phase}_s"] = seconds
    return m


def write_trajectories(path: Path, trajs: Sequence[Trajectory]) -> None:
    if not trajs:
        return
    with path.open("w") as f:
        for t in trajs:
            f.write(json.dumps({
                "uid": t.uid, "version": t.policy_version, "question": t.question, "ground_truth": t.ground_truth,
                "response": t.response_text, "reward": {k: v for k, v in t.reward.items() if isinstance(v, (int, float, bool, str))},
                "num_turns": t.num_turns, "finish_reason": t.finish_reason,
                "tool_calls": [{"name": c.name, "arguments": c.arguments, "ok": c.ok, "text": c.text} for c in t.tool_calls],
            }, default=str) + "\n")


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding(t: Trajectory) -> tuple[float, float] | None:
    """(IoU, contains-centre) of the first valid zoom box vs the target box in the model frame.

    None when the row has no target box. Tiny targets (a few pixels in the frame) cap the IoU of
    any useful zoom box far below 1, so whether the box holds the target's centre is reported too.
    """
    target, orig = t.extra.get("target_bbox"), t.extra.get("orig_size")
    if not target or not orig or not t.images:
        return None
    fw, fh = t.images[0].size
    sx, sy = fw / orig[0], fh / orig[1]
    tb = [target[0] * sx, target[1] * sy, target[2] * sx, target[3] * sy]
    cx, cy = (tb[0] + tb[2]) / 2, (tb[1] + tb[3]) / 2
    for c in t.tool_calls:
        box = (c.arguments or {}).get("bbox_2d") if isinstance(c.arguments, dict) else None
        if c.executed and c.ok and isinstance(box, list) and len(box) == 4:
            b = [float(v) for v in box]
            return iou(b, tb), float(b[0] <= cx <= b[2] and b[1] <= cy <= b[3])
    return 0.0, 0.0


def validate(cfg: Config, handle: Any, val: Any, step: int, version: int) -> dict[str, float]:
    rows = list(range(len(val) if cfg.trainer.val_rows <= 0 else min(cfg.trainer.val_rows, len(val))))
    trajs, failed = run_episodes(handle, episode_requests(cfg, val.rows, rows, step, version, 1, greedy=True, tag="v"))
    ground = [g for g in (grounding(t) for t in trajs) if g is not None]
    return {
        "val/acc": sum(float(t.reward.get("acc", 0.0)) for t in trajs) / max(len(trajs), 1),
        "val/score": sum(float(t.reward.get("score", 0.0)) for t in trajs) / max(len(trajs), 1),
        "val/tool_use": sum(1.0 for t in trajs if t.crops_returned > 0) / max(len(trajs), 1),
        "val/grounding_iou": sum(g[0] for g in ground) / len(ground) if ground else 0.0,
        "val/box_holds_target": sum(g[1] for g in ground) / len(ground) if ground else 0.0,
        "val/episodes": float(len(trajs)), "val/failed": float(failed),
    }
