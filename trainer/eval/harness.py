"""Run benchmark items as agent episodes through the rollout app and write what came out.

`run_items` is the loop both the CLI (`python -m trainer eval`) and the trainer's validation use:
items are taken a chunk at a time (images decoded for that chunk only), each as k samples per
mode (with the tool / without it), all of a chunk in flight at once on the rollout replicas; each
episode is scored by the rule matcher, the judge only when the answer names no option.
`EvalCluster` starts what the trainer starts (a local Ray cluster unless one is named, the tools,
judge and rollout Serve apps on the policy folder) with the trainer's own helpers (trainer/cluster.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import yaml

from deepeyes.config import to_dict
from deepeyes.contracts import ScoreRequest
from deepeyes.policy import resize_for_model
from deepeyes.serving import APP_NAMES, DEPLOYMENT_NAMES
from trainer.cluster import connect_ray, deploy_services, release_cluster
from trainer.eval.items import Item
from trainer.eval.protocol import (Outcome, decode_item_image, episode_request, failed_outcome, outcome_from,
                                   sample_prompt)
from trainer.rollouts import run_episodes
from trainer.sft import prepared_policy_path

log = logging.getLogger("deepeyes.eval")


def judge_with(judge_handle: Any, timeout_s: float = 600.0) -> Callable[[Any, Any], tuple[bool, bool]]:
    """A verdict callable for outcome_from: the rollout's own reward when it scored the episode,
    else the judge app (None: no judge, every unmatched answer is a judge failure)."""
    def verdict(traj: Any, prompt: Any) -> tuple[bool, bool]:
        if traj.reward is not None:
            return traj.reward.acc == 1.0, bool(traj.reward.judge_ok)
        if judge_handle is None:
            return False, False
        req = ScoreRequest(response_text=traj.response_text, question=prompt.text, ground_truth=prompt.reference,
                           data_source=traj.data_source, tool_calls=sum(1 for c in traj.tool_calls if c.executed),
                           crops=traj.crops_returned)
        try:
            res = judge_handle.score.remote(req).result(timeout_s=timeout_s)
        except Exception as e:  # counted as a judge failure, the run goes on
            log.warning("judge failed on %s: %s: %s", traj.uid, type(e).__name__, e)
            return False, False
        return res.acc == 1.0, bool(res.judge_ok)

    return verdict


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class EvalPlan:
    """How each item is run: `k` samples per mode (`tool`, `no_tool`), options shuffled per sample
    from `seed` (unless `shuffle` is off), greedy or at `temperature`, crops cut from the original at
    the mapped box (`map_crops`), frames smart-resized to [min_pixels, max_pixels], at policy
    version `min_version` or later; `chunk_items` items in flight at once; uids start with `tag`."""

    k: int
    modes: Sequence[str]
    seed: int
    greedy: bool
    temperature: float | None
    map_crops: bool
    min_pixels: int
    max_pixels: int
    factor: int = 28  # the policy family's smart-resize grid (deepeyes/family.py)
    box_scale: str = "absolute"  # what the system prompt asks the boxes in (tools.box_scale, resolved)
    min_version: int = 0
    shuffle: bool = True
    chunk_items: int = 8
    tag: str = "e"


def run_items(handle: Any, judge_handle: Any, items: Iterable[Item], plan: EvalPlan,
              on_record: Callable[[dict[str, Any], Any], None] | None = None) -> list[Outcome]:
    """Every item, run as `plan` says, through the rollout handle; returns the Outcomes.

    `on_record(record, trajectory_or_None)` sees each episode's items.jsonl record (and its
    trajectory, e.g. for grounding figures) as its chunk finishes.
    """
    verdict = judge_with(judge_handle)
    outcomes: list[Outcome] = []
    for chunk in _chunks(items, plan.chunk_items):
        reqs, meta = [], {}
        for item in chunk:
            image, orig_size = decode_item_image(item)
            frame = resize_for_model(image, plan.min_pixels, plan.max_pixels, plan.factor)
            del image
            for s in range(plan.k):
                prompt = sample_prompt(item, s, plan.seed, plan.shuffle)
                for mode in plan.modes:
                    uid = f"{plan.tag}-{mode}-{item.benchmark}-{item.id}-{s}"
                    meta[uid] = (item, prompt, mode, s)
                    reqs.append(episode_request(item, prompt, mode=mode, frame=frame, uid=uid,
                                                group_id=f"{plan.tag}-{mode}-{item.benchmark}-{item.id}",
                                                greedy=plan.greedy, temperature=plan.temperature,
                                                map_crops=plan.map_crops, min_version=plan.min_version,
                                                orig_size=orig_size, box_scale=plan.box_scale))
        trajs, _ = run_episodes(handle, reqs)
        by_uid = {t.uid: t for t in trajs}
        for uid, (item, prompt, mode, s) in meta.items():
            t = by_uid.get(uid)
            out, record = (outcome_from(t, item, prompt, mode, s, verdict) if t is not None
                           else failed_outcome(item, prompt, mode, s))
            outcomes.append(out)
            if on_record is not None:
                on_record(record, t)
    return outcomes


# ---------------------------------------------------------------------------------------------
# the table


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The stdout table: one line per benchmark and mode, then per category with vs without tool."""
    head = (f"{'benchmark':<14} {'mode':<8} {'items':>5} {'k':>3} {'Avg@k':>7} {'pass@k':>7} {'tool_use':>8} "
            f"{'calls/ep':>8} {'err_turns':>9} {'answered':>8} {'judged':>7} {'failed':>6}")
    lines = [head, "-" * len(head)]
    for bench, modes in results.items():
        for mode, s in modes.items():
            lines.append(f"{bench:<14} {mode:<8} {s['items']:>5} {s['k']:>3} {s['avg@k']:>7.3f} {s['pass@k']:>7.3f} "
                         f"{s['tool_use']:>8.3f} {s['calls_per_episode']:>8.2f} {s['error_turn_rate']:>9.3f} "
                         f"{s['answered']:>8.3f} {s['judged']:>7.3f} {s['failed']:>6}")
        cats = sorted({c for s in modes.values() for c in s["categories"]})
        for c in cats:
            parts = "  ".join(f"{mode} {modes[mode]['categories'].get(c, {}).get('avg@k', 0.0):.3f}"
                              for mode in modes)
            lines.append(f"{'':<14}   Avg@k {c}: {parts}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the cluster


class EvalCluster:
    """Ray + the three Serve apps for an evaluation, started as the trainer starts them.

    The rollout app runs with rollout.reward=never: the harness scores (rule matcher first, the
    judge app only for answers that name no option).
    """

    def __init__(self, cfg: Any, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir
        self.started_ray = False
        self.deployed: list[str] = []
        self.policy_dir: Path | None = None  # set by start()
        self.startup_s = 0.0

    def start(self) -> tuple[Any, Any]:
        from ray import serve  # Ray Serve: only a cluster run needs it, the writer does not

        t0 = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        self.policy_dir = prepared_policy_path(self.cfg, progress=self.cfg.logging.progress)
        self.started_ray = connect_ray(self.cfg)
        self.deployed = deploy_services(self.cfg, self.out_dir, self.policy_dir)
        self.startup_s = time.perf_counter() - t0
        handle = serve.get_deployment_handle(DEPLOYMENT_NAMES["rollout"], app_name=APP_NAMES["rollout"])
        judge = serve.get_deployment_handle(DEPLOYMENT_NAMES["judge"], app_name=APP_NAMES["judge"])
        return handle, judge

    def stop(self) -> None:
        release_cluster(self.started_ray, self.deployed)
