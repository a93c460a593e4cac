"""The metric vocabulary (DESIGN section 8) and where metrics go: JSONL, TensorBoard, Ray metrics.

Names are the DESIGN's (`reward/score`, `timing/rollout_s`, ...). Prometheus forbids '/', so the
Ray metric of `reward/score` is `deepeyes_reward_score`; the description keeps the DESIGN name.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

REWARD = ("reward/score", "reward/acc", "reward/format", "reward/tool")
ROLLOUT = ("rollout/num_turns", "rollout/tool_calls", "rollout/tool_errors", "rollout/response_tokens",
           "rollout/clip_ratio")
JUDGE = ("judge/latency_s", "judge/failures")
ACTOR = ("actor/entropy", "actor/pg_loss", "actor/clipfrac", "actor/grad_norm", "actor/lr")
SYNC = ("sync/seconds", "sync/version")
PHASES = ("rollout", "old_logprob", "update", "publish", "step")
PERF = ("perf/tokens_per_s",)
VOCABULARY = REWARD + ROLLOUT + JUDGE + ACTOR + SYNC + tuple(f"timing/{p}_s" for p in PHASES) + PERF


def prometheus_name(name: str) -> str:
    """`reward/score` -> `deepeyes_reward_score` (what the dashboard and Prometheus show)."""
    return "deepeyes_" + name.replace("/", "_").replace("-", "_")


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(statistics.fmean(xs)) if xs else 0.0


def trajectory_metrics(trajs: Sequence[Any], max_response_length: int) -> dict[str, float]:
    """Reward and rollout metrics of one step's trajectories."""
    def part(t: Any, key: str) -> float:
        return float(t.reward.get(key, 0.0))

    return {
        "reward/score": mean(part(t, "score") for t in trajs),
        "reward/acc": mean(part(t, "acc") for t in trajs),
        "reward/format": mean(part(t, "format") for t in trajs),
        "reward/tool": mean(part(t, "tool") for t in trajs),
        "rollout/num_turns": mean(t.num_turns for t in trajs),
        "rollout/tool_calls": mean(sum(1 for c in t.tool_calls if c.executed) for t in trajs),
        "rollout/tool_errors": mean(sum(1 for c in t.tool_calls if c.executed and not c.ok) for t in trajs),
        "rollout/response_tokens": mean(len(t.response_ids) for t in trajs),
        "rollout/clip_ratio": mean(float(t.finish_reason in ("budget", "turn_cap")) for t in trajs),
        "judge/latency_s": mean(float(t.reward.get("judge_latency_s", 0.0)) for t in trajs),
        "judge/failures": float(sum(1 for t in trajs if not t.reward.get("judge_ok", True))),
    }


class MetricsSink:
    """Writes one record per step to metrics.jsonl, TensorBoard events and Ray gauges (rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike[str], tensorboard: bool = True, ray_metrics: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.gauges: dict[str, Any] = {}
        self.ray_metrics = ray_metrics

    def _gauge(self, name: str) -> Any:
        if name not in self.gauges:
            from ray.util.metrics import Gauge

            self.gauges[name] = Gauge(prometheus_name(name), description=f"deepeyes {name}",
                                      tag_keys=("app", "phase"))
        return self.gauges[name]

    def write(self, step: int, metrics: dict[str, float]) -> None:
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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
