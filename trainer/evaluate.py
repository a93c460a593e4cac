"""Validation: greedy (or rollout.val_temperature) episodes on the held-out split through the same
rollout app and the evaluation harness's scoring (trainer/eval), with accuracy, tool use and
whether the zoom box lands on the target."""

from __future__ import annotations

from typing import Any, Sequence

from deepeyes.config import Config
from services.rollout.trajectory import Trajectory


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
    """Validation metrics at `step`: the evaluation harness's protocol on the held-out rows (one
    sample per row, options shuffled by rollout.seed (the same orders every step), rule matcher first, the judge
    for answers naming no option), greedy unless rollout.val_temperature > 0.

    The rows are taken one chunk at a time (`for row in val`), so their images are decoded per
    chunk. The crop is cut from the model frame, as in training (eval maps it to the original).
    """
    from trainer.eval.harness import run_items
    from trainer.eval.items import item_from_row, limit
    from trainer.eval.protocol import summarize

    greedy = cfg.rollout.val_temperature <= 0
    ground: list[tuple[float, float]] = []
    scores: list[float] = []

    def keep(record: dict[str, Any], traj: Any) -> None:
        if traj is None:
            return
        g = grounding(traj)
        if g is not None:
            ground.append(g)
        if traj.reward is not None and traj.reward.judge_ok:
            scores.append(traj.reward.score)

    rows = val.iter_rows() if hasattr(val, "iter_rows") else iter(val)  # a row stream or a DataSet
    items = limit((item_from_row(row, "val") for row in rows), cfg.trainer.val_rows)
    outcomes = run_items(handle, judge_handle, items, k=1, modes=("tool",), seed=cfg.rollout.seed,
                         greedy=greedy, temperature=None if greedy else cfg.rollout.val_temperature,
                         map_crops=False, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels,
                         min_version=version, tag=f"v{step}", on_record=keep)
    s = summarize(outcomes, 1)
    return {
        "val/acc": s["avg@k"],
        "val/score": sum(scores) / len(scores) if scores else 0.0,
        "val/tool_use": sum(1.0 for o in outcomes if o.crops > 0) / max(len(outcomes), 1),
        "val/grounding_iou": sum(g[0] for g in ground) / len(ground) if ground else 0.0,
        "val/box_holds_target": sum(g[1] for g in ground) / len(ground) if ground else 0.0,
        "val/episodes": float(s["episodes"] - s["failed"]), "val/failed": float(s["failed"]),
        "val/judge_failures": float(s["judge_failures"]),
    }
