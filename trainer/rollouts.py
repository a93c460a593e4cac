"""What the trainer asks of the rollout app: episode requests for a prompt batch, running them
with one retry, the judge's verdict on what to keep, and DAPO's refill of flat groups.

Rewards come back inside each trajectory as the judge service's typed `RewardResult`, with the
judge's failure policy already applied (`drop` marks a sample the policy removes). Episodes the
rollout did not score (rollout.reward=never, or no judge app when it ran) are scored here through
the judge app's handle: the driver scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from deepeyes.toolspec import check_row_tools
from deepeyes.config import Config
from deepeyes.policy import resize_for_model
from deepeyes.chat import with_box_scale
from deepeyes.policy_family import frame_factor, zoom_box_scale
from services.judge.scoring import JudgeFailure
from services.rollout.trajectory import Trajectory
from services.rollout.types import EpisodeRequest
from trainer.grpo import zero_variance_groups

log = logging.getLogger("deepeyes.trainer")

EPISODE_TIMEOUT_S = 1800.0  # one episode (all its turns, tools and judging) through the handle
JUDGE_TIMEOUT_S = 600.0     # the driver scoring one unscored episode (the judge retries inside)


def episode_requests(cfg: Config, rows: Sequence[Any], row_ids: Sequence[int], step: int, version: int,
                     n: int, greedy: bool = False, temperature: float | None = None,
                     tag: str = "s") -> list[EpisodeRequest]:
    """n requests per prompt.

    Images go out already in the model frame: the rollout would bring them there itself (its
    resize is the identity on such images), but a DeepEyes original is several megapixels and
    each of the n requests carries its own copy, so the trainer sends the smaller frame. With
    `tools.crop_from=original` the first image's encoded bytes go along too (one shared object:
    the n requests pickle the same bytes), and zooms are cut from them at the mapped box.
    """
    reqs = []
    factor, box_scale = frame_factor(cfg.model), zoom_box_scale(cfg)
    for rid in row_ids:
        row = rows[rid]
        frames = [resize_for_model(im, cfg.model.min_pixels, cfg.model.max_pixels, factor) for im in row.images]
        source = row.image_bytes[0] if cfg.tools.crop_from == "original" and row.image_bytes else None
        # target_bbox is in the stored image's pixels (before any upscale of tiny images)
        extra = dict(row.extra, orig_size=list(row.image_sizes[0]) if row.image_sizes else None, row_id=row.index)
        check_row_tools(extra.get("tools"), cfg.tools.enabled, row.index)
        messages = with_box_scale(row.messages, box_scale)  # the system turn names the box scale
        for k in range(n):
            reqs.append(EpisodeRequest(
                uid=f"{tag}{step}-{row.index}-{k}", group_id=f"{tag}{step}-{row.index}",
                messages=messages, images=frames, ground_truth=row.ground_truth,
                question=row.question, data_source=row.data_source, extra=extra,
                min_version=version, greedy=greedy, temperature=temperature, crop_source=source,
                seed=(cfg.rollout.seed * 1_000_003 + step * 10_007 + rid * 101 + k) % (2**31)))
    return reqs


def submit_episodes(handle: Any, reqs: Sequence[EpisodeRequest]) -> list[tuple[EpisodeRequest, Any]]:
    """All requests in flight at once; (request, response) pairs for run_episodes."""
    return [(r, handle.run_episode.remote(r)) for r in reqs]


def run_episodes(handle: Any, reqs: Sequence[EpisodeRequest], timeout_s: float = EPISODE_TIMEOUT_S,
                 pending: list[tuple[EpisodeRequest, Any]] | None = None) -> tuple[list[Trajectory], int]:
    """All requests in flight at once (or `pending`, already submitted); one retry per failed
    episode; returns (trajectories, failed)."""
    pending = pending if pending is not None else submit_episodes(handle, reqs)
    out: list[Trajectory] = []
    failed = 0
    retry = []
    for req, resp in pending:
        try:
            out.append(resp.result(timeout_s=timeout_s))
        except JudgeFailure:  # judge.failure_policy=fail: the step fails, naming the judge's cause
            raise
        except Exception as e:  # a replica died or the episode raised: retry once, then count it
            log.warning("episode %s failed (%s: %s); retrying once", req.uid, type(e).__name__, e)
            retry.append((req, handle.run_episode.remote(req)))
    for req, resp in retry:
        try:
            out.append(resp.result(timeout_s=timeout_s))
        except JudgeFailure:
            raise
        except Exception as e:
            log.error("episode %s failed twice (%s: %s); dropped", req.uid, type(e).__name__, e)
            failed += 1
    return out, failed


def score_unscored(judge_handle: Any, trajs: Sequence[Trajectory], timeout_s: float = JUDGE_TIMEOUT_S) -> None:
    """Rewards for episodes the rollout did not score, from the judge app (failure policy applied there)."""
    todo = [t for t in trajs if t.reward is None]
    if not todo:
        return
    if judge_handle is None:
        raise RuntimeError(f"{len(todo)} episodes came back unscored and no judge app is running: deploy the "
                           f"'judge' app or set rollout.reward=auto")
    pending = [(t, judge_handle.score.remote(t.score_request())) for t in todo]
    for t, resp in pending:
        t.reward = resp.result(timeout_s=timeout_s)


def keep_judged(trajs: list[Trajectory]) -> tuple[list[Trajectory], int]:
    """(the trajectories the judge's failure policy keeps, how many judgments failed)."""
    failures = sum(1 for t in trajs if not t.reward.judge_ok)
    return [t for t in trajs if not t.reward.drop], failures


@dataclass
class Inflight:
    """Episodes submitted ahead (trainer.max_staleness > 0): they generate while the update runs."""

    pending: list[tuple[EpisodeRequest, Any]]
    handle: Any
    done: tuple[list[Trajectory], int] | None = None

    def wait(self) -> tuple[list[Trajectory], int]:
        if self.done is None:
            self.done = run_episodes(self.handle, [], pending=self.pending)
        return self.done


@dataclass
class Rollouts:
    """One step's rollouts on this worker: runs episodes and keeps the failure counts.

    Invariant: `asked`, `failed` and `judge_failures` count every episode this step asked for,
    refills included, so the step metrics (and the judge stop) see every loss.
    """

    cfg: Config
    handle: Any
    judge_handle: Any
    step: int
    version: int
    asked: int = 0
    failed: int = 0
    judge_failures: int = 0
    take_rows: Callable[[int], list[Any]] = field(default=lambda k: [])
    max_staleness: int = 0
    stale_dropped: int = 0
    staleness: list[int] = field(default_factory=list)  # of every kept episode: version - its policy version

    def submit(self, rows: Sequence[Any], step: int, tag: str = "s") -> Inflight:
        """Episodes of `rows` for `step` at this version or newer, in flight; counted when collected."""
        reqs = episode_requests(self.cfg, {r.position: r for r in rows}, [r.position for r in rows], step,
                                self.version, self.cfg.rollout.n, tag=tag)
        return Inflight(submit_episodes(self.handle, reqs), self.handle)

    def run(self, rows: Sequence[Any], tag: str = "s") -> list[Trajectory]:
        """Episodes of `rows` (data rows from the stream; their `position` seeds the sampling)."""
        return self.collect(self.submit(rows, self.step, tag))

    def collect(self, inflight: Inflight) -> list[Trajectory]:
        """The episodes of `inflight`, judged; those sampled more than max_staleness versions
        before this step's policy are dropped and counted (an episode's version is the one it
        started with)."""
        self.asked += len(inflight.pending)
        trajs, failed = inflight.wait()
        fresh = [t for t in trajs if self.version - t.policy_version <= self.max_staleness]
        self.stale_dropped += len(trajs) - len(fresh)
        self.staleness += [self.version - t.policy_version for t in fresh]
        trajs = fresh
        score_unscored(self.judge_handle, trajs)
        kept, judge_failures = keep_judged(trajs)
        self.failed += failed
        self.judge_failures += judge_failures
        return kept

    def refill(self, take: int, groups_needed: int, round_: int) -> list[Trajectory]:
        """DAPO refill: take `take` rows of the shared data order, roll out `groups_needed` of them."""
        return self.run(self.take_rows(take)[:groups_needed], tag=f"r{round_}s")


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
        flat = zero_variance_groups([t.reward.score for t in trajs], [t.group_id for t in trajs])
        dropped += len(flat)
        trajs = [t for t in trajs if t.group_id not in flat]
        missing = max(0, groups_wanted - len({t.group_id for t in trajs}))
        most = int(global_max(missing))
        if most == 0 or round_ == max_rounds:
            break
        trajs = trajs + more_episodes(most, missing, round_)
    return trajs, dropped
