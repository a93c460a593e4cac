"""The metric vocabulary (docs/design.md, "Metric names") and where metrics go: JSONL, TensorBoard, Ray metrics.

Names are the design's (`reward/score`, `timing/rollout_s`, ...). Prometheus forbids '/', so the
Ray metric of `reward/score` is `deepeyes_reward_score`; the description keeps the design's name.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import statistics
from collections import Counter
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from deepeyes.boxes import box_to_frame, parse_box, scale_box
from deepeyes.images import to_rgb

REWARD = ("reward/score", "reward/acc", "reward/format", "reward/tool")
ROLLOUT = ("rollout/num_turns", "rollout/tool_calls", "rollout/tool_errors", "rollout/response_tokens",
           "rollout/clip_ratio")
JUDGE = ("judge/latency_s", "judge/failures")
ACTOR = ("actor/entropy", "actor/pg_loss", "actor/clipfrac", "actor/grad_norm", "actor/lr")
SYNC = ("sync/seconds", "sync/version")
STEP_PHASES = ("rollout", "old_logprob", "update", "publish")  # the parts of a step, in order
PHASES = STEP_PHASES + ("step",)
PERF = ("perf/tokens_per_s",)
VOCABULARY = REWARD + ROLLOUT + JUDGE + ACTOR + SYNC + tuple(f"timing/{p}_s" for p in PHASES) + PERF
# Beyond the design's vocabulary: counters of what a step lost, engine/trainer agreement, KL, and
# validation. MetricsSink refuses any other name, so a typo fails the run instead of a plot.
STEP_EXTRAS = ("rollout/failed_episodes", "rollout/dropped_groups", "rollout/logprob_mismatch",
               "rollout/episodes", "actor/kl", "data/skipped_rows", "data/epoch",
               "async/stale_dropped", "async/staleness_mean", "async/staleness_max", "async/fresh_share",
               "timing/trainer_idle_share", "timing/rollout_idle_share")
VALIDATION = ("val/acc", "val/acc_no_tool", "val/score", "val/tool_use", "val/calls_per_episode",
              "val/tool_error_rate", "val/answered", "val/grounding_iou", "val/box_holds_target",
              "val/items", "val/k", "val/episodes", "val/failed", "val/judge_failures")
STALENESS_BOUNDS = (0.5, 1.5, 2.5, 4.5, 8.5)  # buckets 0, 1, 2, 3-4, 5-8, more
KNOWN = frozenset(VOCABULARY + STEP_EXTRAS + VALIDATION)


def prometheus_name(name: str) -> str:
    """`reward/score` -> `deepeyes_reward_score` (what the dashboard and Prometheus show)."""
    return "deepeyes_" + name.replace("/", "_").replace("-", "_")


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(statistics.fmean(xs)) if xs else 0.0


def episode_summary(t: Any) -> dict[str, Any]:
    """What the step metrics need of one trajectory: small, picklable, gathered across workers."""
    return {"reward": {k: v for k, v in t.reward.to_dict().items() if isinstance(v, (int, float, bool))},
            "num_turns": t.num_turns, "finish_reason": t.finish_reason,
            "response_tokens": len(t.response_ids),
            "calls": [(c.executed, c.ok) for c in t.tool_calls],
            "tools": [(c.name, c.status, c.latency_s) for c in t.tool_calls if c.executed and c.name]}


def trajectory_metrics(episodes: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Reward and rollout metrics of one step, from `episode_summary` records."""
    def part(e: dict[str, Any], key: str) -> float:
        return float(e["reward"].get(key, 0.0))

    return {
        "reward/score": mean(part(e, "score") for e in episodes),
        "reward/acc": mean(part(e, "acc") for e in episodes),
        "reward/format": mean(part(e, "format") for e in episodes),
        "reward/tool": mean(part(e, "tool") for e in episodes),
        "rollout/num_turns": mean(e["num_turns"] for e in episodes),
        "rollout/tool_calls": mean(sum(1 for ex, _ in e["calls"] if ex) for e in episodes),
        "rollout/tool_errors": mean(sum(1 for ex, ok in e["calls"] if ex and not ok) for e in episodes),
        "rollout/response_tokens": mean(e["response_tokens"] for e in episodes),
        "rollout/clip_ratio": mean(float(e["finish_reason"] in ("budget", "turn_cap")) for e in episodes),
        "judge/latency_s": mean(part(e, "judge_latency_s") for e in episodes),
        **per_tool_metrics(episodes),
    }


KILLED = ("timeout", "memory", "killed", "lost")  # calls the tool could not finish
TOOL_PARTS = ("calls", "errors", "kills", "latency_s")


def result_images(c: Any) -> int:
    """Images a call's result added to the trajectory (a record that did not count them: the
    zoom's shape, one crop when it was ok and appended)."""
    return c.images if c.images >= 0 else int(c.ok and c.appended)


def per_tool_metrics(episodes: Sequence[dict[str, Any]]) -> dict[str, float]:
    """tools/<name>/{calls, errors, kills, latency_s} per episode (latency: mean per call), for each
    tool called this step (docs/design.md, "Metric names")."""
    by_tool: dict[str, list[tuple[str, float]]] = {}
    for e in episodes:
        for name, status, latency in e.get("tools", ()):
            by_tool.setdefault(name, []).append((status, latency))
    n = max(len(episodes), 1)
    out: dict[str, float] = {}
    for name, calls in sorted(by_tool.items()):
        out[f"tools/{name}/calls"] = len(calls) / n
        out[f"tools/{name}/errors"] = sum(1 for st, _ in calls if st != "ok") / n
        out[f"tools/{name}/kills"] = sum(1 for st, _ in calls if st in KILLED) / n
        out[f"tools/{name}/latency_s"] = mean(lat for _, lat in calls)
    return out


@dataclass
class UpdateStats:
    """Sums over the policy tokens of one worker's update (turned into means over the world)."""

    pg_loss: float = 0.0
    entropy_sum: float = 0.0
    clipped: float = 0.0
    tokens: float = 0.0
    grad_norm: float = 0.0
    kl_sum: float = 0.0
    micro_batches: int = 0


def stats_world(gathered: list[dict[str, Any]]) -> UpdateStats:
    total = UpdateStats()
    for g in gathered:
        s = g["stats"]
        for k in ("pg_loss", "entropy_sum", "clipped", "tokens", "kl_sum"):
            setattr(total, k, getattr(total, k) + s[k])
        total.grad_norm = s["grad_norm"]  # identical on every rank after the all-reduce
    return total


def latest_stamps(stamps: Iterable[tuple[str, float, float]]) -> dict[str, tuple[float, float]]:
    """The latest (wall time, engine busy seconds) of each rollout replica among (replica, wall, busy) stamps."""
    out: dict[str, tuple[float, float]] = {}
    for replica, wall, busy in stamps:
        if replica not in out or wall > out[replica][0]:
            out[replica] = (float(wall), float(busy))
    return out


def engine_stamps(trajs: Iterable[Any]) -> dict[str, tuple[float, float]]:
    """The latest stamp each rollout replica put on these episodes (RolloutWorker.run_episode)."""
    return latest_stamps(t.extra["engine_stamp"] for t in trajs if t.extra.get("engine_stamp"))


def rollout_idle_share(seen: dict[str, tuple[float, float]], stamps: dict[str, tuple[float, float]]) -> float | None:
    """Mean over replicas of 1 - (busy seconds / wall seconds) between the stamp last seen and the
    new one (replicas seen for the first time only start their count); updates `seen`. None when no
    replica has two stamps yet. A decode's seconds count when it ends, so short windows are rough."""
    shares = []
    for replica, (wall, busy) in stamps.items():
        prev = seen.get(replica)
        if prev is not None and wall > prev[0]:
            shares.append(min(1.0, max(0.0, 1.0 - (busy - prev[1]) / (wall - prev[0]))))
        if prev is None or wall > prev[0]:
            seen[replica] = (wall, busy)
    return sum(shares) / len(shares) if shares else None


def step_metrics(gathered: list[dict[str, Any]], timings: dict[str, float], version: int, lr: float,
                 with_kl: bool) -> dict[str, float]:
    """One step's metrics from every worker's gathered record (episode summaries, counts, stats)."""
    episodes = [d for g in gathered for d in g["trajs"]]
    st = stats_world(gathered)
    m = trajectory_metrics(episodes)
    tok = max(st.tokens, 1.0)
    m.update({
        # failed judgments of the whole step, the samples the failure policy dropped included
        "judge/failures": float(sum(g["judge_failures"] for g in gathered)),
        "actor/pg_loss": st.pg_loss / tok, "actor/entropy": st.entropy_sum / tok,
        "actor/clipfrac": st.clipped / tok, "actor/grad_norm": st.grad_norm, "actor/lr": lr,
        "sync/seconds": timings["publish"], "sync/version": float(version),
        "rollout/failed_episodes": float(sum(g["failed"] for g in gathered)),
        "rollout/dropped_groups": float(sum(g["dropped_groups"] for g in gathered)),
        "rollout/logprob_mismatch": max(g["mismatch"] for g in gathered),
        "rollout/episodes": float(len(episodes)),
        # every worker reads the same rows, so rank 0's counts are the run's
        "data/skipped_rows": float(gathered[0].get("data_skipped", 0)),
        "data/epoch": float(gathered[0].get("data_epoch", 0.0)),
        # async (trainer.max_staleness > 0): how old the trained episodes were, how many were too old
        "async/stale_dropped": float(sum(g.get("stale_dropped", 0) for g in gathered)),
        "async/staleness_mean": mean(x for g in gathered for x in g.get("staleness", [])),
        "async/staleness_max": float(max((x for g in gathered for x in g.get("staleness", [])), default=0)),
        "async/fresh_share": mean(float(x == 0) for g in gathered for x in g.get("staleness", [])),
        # the share of the step the trainer waited for episodes
        "timing/trainer_idle_share": timings["rollout"] / max(timings["step"], 1e-9),
        "perf/tokens_per_s": sum(g["tokens"] for g in gathered) / max(timings["rollout"], 1e-9),
    })
    if with_kl:
        m["actor/kl"] = st.kl_sum / tok
    for phase, seconds in timings.items():
        m[f"timing/{phase}_s"] = seconds
    return m


THUMBNAIL_SIDE = 512  # longest side of a saved image; the 7B recipe's model frame reaches 3584 px
JPEG_QUALITY = 85


def target_box(t: Any) -> list[float] | None:
    """The data row's target box mapped into the model frame (stored pixels -> images[0])."""
    target, orig = t.extra.get("target_bbox"), t.extra.get("orig_size")
    if not target or not orig or not t.images:
        return None
    return scale_box(target, orig, t.images[0].size)


def frame_box_of(arguments: Any, t: Any, box_scale: str) -> list[float] | None:
    """A call's box in model-frame pixels (what the viewer draws), whatever scale the model wrote."""
    box = parse_box(arguments)
    if box is None or not t.images:
        return box
    return box_to_frame(box, t.images[0].size, box_scale)


def _turns(t: Any, decode: Callable[[list[int]], str]) -> list[dict[str, Any]]:
    """The response as turns: each run of policy tokens (loss mask 1) is an assistant turn, decoded
    as the agent loop decodes it; each run of observation tokens (mask 0) is a tool turn."""
    turns = []
    for policy, run in itertools.groupby(zip(t.loss_mask, t.response_ids), key=lambda p: p[0]):
        ids = [i for _, i in run]
        turns.append({"role": "assistant", "tokens": len(ids), "text": decode(ids)} if policy
                     else {"role": "tool", "tokens": len(ids)})
    return turns


def thumbnail_jpeg(image: Any) -> bytes:
    """`image` as a JPEG thumbnail, longest side THUMBNAIL_SIDE (what people look at, not the model)."""
    im = to_rgb(image).copy()  # to_rgb hands an RGB image back as is; thumbnail() works in place
    im.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_trajectories(path: Path, trajs: Sequence[Any], advantages: Sequence[float], keep: int,
                       decode: Callable[[list[int]], str], image_kb: int, box_scale: str = "absolute") -> None:
    """The first `keep` episodes of a step, for people to read and `python -m trainer view` to show.

    `path` (`trajectories/step_000001.jsonl`) gets one line per episode: text per turn, tool calls
    with their boxes, reward parts, GRPO advantage (`advantages[i]` is that of `trajs[i]`, the
    group counted over all of `trajs`), token counts. The folder beside it (`step_000001/`) gets
    JPEG thumbnails (longest side THUMBNAIL_SIDE) of each kept episode's model-frame original, then
    of the crops that came back, until `image_kb` KiB are spent (0 = no images). The JSONL goes
    in place by rename, after its images, so a reader never sees a half-written step.
    """
    kept = list(zip(trajs, advantages))[:keep]
    if not kept:
        return
    group_sizes = Counter(t.group_id for t in trajs)
    # images[first_crop:] are the crops, in the order of the calls whose result was appended (the
    # agent loop's order); the images before them came with the prompt, images[0] the original.
    returned = [[c for c in t.tool_calls if c.ok and c.appended and result_images(c) > 0] for t, _ in kept]
    first_crop = [len(t.images) - sum(result_images(c) for c in r) for (t, _), r in zip(kept, returned)]
    shown = [i for i in range(len(kept)) if first_crop[i] > 0]
    wanted = [(i, 0) for i in shown] + [(i, k) for i in shown for k in range(first_crop[i], len(kept[i][0].images))]
    folder = path.with_suffix("")
    files: dict[tuple[int, int], str] = {}  # (episode, image) -> path relative to path's folder
    budget = image_kb * 1024
    for i, k in wanted:  # originals of every episode first, then the crops, while the budget lasts
        if budget <= 0:
            break
        data = thumbnail_jpeg(kept[i][0].images[k])
        if len(data) > budget:
            continue
        budget -= len(data)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{folder.name}/{re.sub(r'[^A-Za-z0-9_.-]', '_', kept[i][0].uid)}_{k}.jpg"
        (path.parent / name).write_bytes(data)
        files[(i, k)] = name

    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for i, (t, adv) in enumerate(kept):
            crop_of, at = {}, first_crop[i]  # each returned call's images, in order (a code call may have several)
            for c in returned[i]:
                crop_of[id(c)] = list(range(at, at + result_images(c)))
                at += result_images(c)
            f.write(json.dumps({
                "uid": t.uid, "group_id": t.group_id, "group_size": group_sizes[t.group_id],
                "version": t.policy_version, "data_source": t.data_source, "question": t.question,
                "ground_truth": t.ground_truth, "response": t.response_text,
                "reward": {k: v for k, v in t.reward.to_dict().items() if isinstance(v, (int, float, bool, str))},
                "advantage": float(adv), "num_turns": t.num_turns, "finish_reason": t.finish_reason,
                "prompt_tokens": len(t.prompt_ids), "response_tokens": len(t.response_ids),
                "policy_tokens": sum(t.loss_mask), "turns": _turns(t, decode),
                "tool_calls": [{"turn": c.turn, "name": c.name, "arguments": c.arguments, "ok": c.ok, "text": c.text,
                                "executed": c.executed, "appended": c.appended, "status": c.status,
                                "latency_s": round(c.latency_s, 4), "images": c.images,
                                "box": frame_box_of(c.arguments, t, box_scale),
                                "image": files.get((i, crop_of[id(c)][0])) if id(c) in crop_of else None,
                                "image_files": [files.get((i, k)) for k in crop_of.get(id(c), [])]}
                               for c in t.tool_calls],
                # sizes in the model frame: the boxes' coordinates; "file" is None past the image budget
                "images": [{"file": files.get((i, k)), "width": im.width, "height": im.height}
                           for k, im in enumerate(t.images)],
                "target_box": target_box(t), "timings": t.timings,
            }, default=str) + "\n")
    os.replace(tmp, path)


class MetricsSink:
    """Writes one record per step to metrics.jsonl, TensorBoard events and Ray gauges (rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike[str], tensorboard: bool = True, ray_metrics: bool = True,
                 start_step: int = 1):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run redoes the steps from start_step: drop their old rows
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # TensorBoard: only with logging.tensorboard

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.gauges: dict[str, Any] = {}
        self._staleness: Any = None
        self.ray_metrics = ray_metrics

    def _gauge(self, name: str) -> Any:
        if name not in self.gauges:
            from ray.util.metrics import Gauge  # Ray: only on a cluster

            self.gauges[name] = Gauge(prometheus_name(name), description=f"deepeyes {name}",
                                      tag_keys=("app", "phase"))
        return self.gauges[name]

    def write(self, step: int, metrics: dict[str, float]) -> None:
        # per-tool metrics are a fixed shape over the registry's tool names: tools/<name>/<part>
        unknown = sorted(k for k in set(metrics) - KNOWN if not (k.startswith("tools/") and
                                                                 k.rsplit("/", 1)[-1] in TOOL_PARTS))
        if unknown:
            raise ValueError(f"metric names outside the vocabulary (trainer/metrics.py): {unknown}")
        record = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k == "step" or not math.isfinite(v):
                continue
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
            if self.ray_metrics:
                phase = k.split("/", 1)[1][:-2] if k.startswith("timing/") else ""
                self._gauge(k).set(float(v), tags={"app": "trainer", "phase": phase})
        if self.tb is not None:
            self.tb.flush()

    def observe_staleness(self, staleness: Sequence[int]) -> None:
        """Each trained episode's staleness (versions behind the policy it trained) into the Ray
        histogram `deepeyes_async_staleness` (the dashboard's staleness histogram)."""
        if not self.ray_metrics or not staleness:
            return
        if self._staleness is None:
            from ray.util.metrics import Histogram  # Ray: only on a cluster

            self._staleness = Histogram("deepeyes_async_staleness", boundaries=list(STALENESS_BOUNDS),
                                        description="deepeyes async/staleness: versions between an episode's "
                                                    "policy and the one it trained", tag_keys=("app",))
        for x in staleness:
            self._staleness.observe(float(x), tags={"app": "trainer"})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
