"""Validation: greedy (or rollout.val_temperature) episodes on the held-out split through the same
rollout app, with accuracy, tool use and whether the zoom box lands on the target."""

from __future__ import annotations

from typing import Any, Sequence

from deepeyes.config import Config
from services.rollout.trajectory import Trajectory
from trainer.rollouts import episode_requests, run_episodes, score_unscored


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


def validate(cfg: Config, handle: Any, judge_handle: Any, val: Any, step: int, version: int) -> dict[str, float]:
    """Validation metrics at `step`: greedy episodes unless rollout.val_temperature > 0."""
    rows = list(range(len(val) if cfg.trainer.val_rows <= 0 else min(cfg.trainer.val_rows, len(val))))
    greedy = cfg.rollout.val_temperature <= 0
    reqs = episode_requests(cfg, val.rows, rows, step, version, 1, greedy=greedy,
                            temperature=None if greedy else cfg.rollout.val_temperature, tag="v")
    trajs, failed = run_episodes(handle, reqs)
    score_unscored(judge_handle, trajs)
    judged = [t for t in trajs if t.reward.judge_ok]
    ground = [g for g in (grounding(t) for t in trajs) if g is not None]
    return {
        "val/acc": sum(t.reward.acc for t in judged) / max(len(judged), 1),
        "val/score": sum(t.reward.score for t in judged) / max(len(judged), 1),
        "val/tool_use": sum(1.0 for t in trajs if t.crops_returned > 0) / max(len(trajs), 1),
        "val/grounding_iou": sum(g[0] for g in ground) / len(ground) if ground else 0.0,
        "val/box_holds_target": sum(g[1] for g in ground) / len(ground) if ground else 0.0,
        "val/episodes": float(len(trajs)), "val/failed": float(failed),
        "val/judge_failures": float(len(trajs) - len(judged)),
    }
