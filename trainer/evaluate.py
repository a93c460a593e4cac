"""Validation: greedy (or rollout.val_temperature) episodes on the held-out split through the same
rollout app and the evaluation harness's scoring (trainer/eval), with accuracy, tool use and
whether the zoom box lands on the target."""

from __future__ import annotations

from typing import Any, Sequence

from deepeyes.boxes import box_to_frame, scale_box
from deepeyes.config import Config
from deepeyes.policy_family import frame_factor, zoom_box_scale
from services.rollout.trajectory import Trajectory
from trainer.eval.harness import EvalPlan, run_items
from trainer.eval.items import item_from_row, limit
from trainer.eval.protocol import summarize


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding(t: Trajectory, box_scale: str = "absolute") -> tuple[float, float] | None:
    """(IoU, contains-centre) of the first valid zoom box vs the target box in the model frame.

    None when the row has no target box. Tiny targets (a few pixels in the frame) cap the IoU of
    any useful zoom box far below 1, so whether the box holds the target's centre is reported too.
    """
    target, orig = t.extra.get("target_bbox"), t.extra.get("orig_size")
    if not target or not orig or not t.images:
        return None
    tb = scale_box(target, orig, t.images[0].size)
    cx, cy = (tb[0] + tb[2]) / 2, (tb[1] + tb[3]) / 2
    for c in t.tool_calls:
        box = (c.arguments or {}).get("bbox_2d") if isinstance(c.arguments, dict) else None
        if c.executed and c.ok and isinstance(box, list) and len(box) == 4:
            b = box_to_frame([float(v) for v in box], t.images[0].size, box_scale)
            return iou(b, tb), float(b[0] <= cx <= b[2] and b[1] <= cy <= b[3])
    return 0.0, 0.0


def validate(cfg: Config, handle: Any, judge_handle: Any, val: Any, step: int, version: int,
             full: bool = False) -> dict[str, float]:
    """Validation metrics at `step`: the evaluation harness's protocol on the held-out rows (options
    shuffled by rollout.seed, the same orders every step; rule matcher first, the judge for answers
    naming no option), greedy unless rollout.val_temperature > 0.

    A periodic validation (`full` false) runs the first trainer.val_rows rows once each, with the
    tool. The full one (the SFT start with trainer.val_before_train, and the end of the run) runs
    trainer.final_val_rows rows (0 = val_rows) with trainer.final_val_k samples each, also without
    the tool when trainer.final_val_no_tool (`val/acc_no_tool`: the zoom's share of the accuracy).

    The rows are taken one chunk at a time (`for row in val`), so their images are decoded per
    chunk. The crop is cut as training cuts it: from the model frame, or (tools.crop_from=original)
    from the original at the mapped box.
    """
    greedy = cfg.rollout.val_temperature <= 0
    ground: list[tuple[float, float]] = []
    scores: list[float] = []
    tr = cfg.trainer
    n_rows = (tr.final_val_rows or tr.val_rows) if full else tr.val_rows
    k = tr.final_val_k if full else 1
    modes = ("tool", "no_tool") if full and tr.final_val_no_tool else ("tool",)

    def keep(record: dict[str, Any], traj: Any) -> None:
        if traj is None or record.get("mode") != "tool":
            return
        g = grounding(traj, zoom_box_scale(cfg))
        if g is not None:
            ground.append(g)
        if traj.reward is not None and traj.reward.judge_ok:
            scores.append(traj.reward.score)

    rows = val.iter_rows() if hasattr(val, "iter_rows") else iter(val)  # a row stream or a DataSet
    items = limit((item_from_row(row, "val") for row in rows), n_rows)
    plan = EvalPlan(k=k, modes=modes, seed=cfg.rollout.seed, greedy=greedy,
                    temperature=None if greedy else cfg.rollout.val_temperature,
                    map_crops=cfg.tools.crop_from == "original", min_pixels=cfg.model.min_pixels,
                    max_pixels=cfg.model.max_pixels, factor=frame_factor(cfg.model), box_scale=zoom_box_scale(cfg),
                    min_version=version, tag=f"v{step}")
    outcomes = run_items(handle, judge_handle, items, plan, on_record=keep)
    tool = [o for o in outcomes if o.mode == "tool"]
    s = summarize(tool, k)
    n = max(len(tool), 1)
    out = {
        "val/acc": s["avg@k"],
        "val/score": sum(scores) / len(scores) if scores else 0.0,
        "val/tool_use": sum(1.0 for o in tool if o.crops > 0) / n,  # valid calls: a crop came back
        "val/calls_per_episode": s["calls_per_episode"],
        "val/tool_error_rate": s["error_turn_rate"],
        "val/answered": s["answered"],
        "val/grounding_iou": sum(g[0] for g in ground) / len(ground) if ground else 0.0,
        "val/box_holds_target": sum(g[1] for g in ground) / len(ground) if ground else 0.0,
        "val/items": float(s["items"]), "val/k": float(k),
        "val/episodes": float(s["episodes"] - s["failed"]), "val/failed": float(s["failed"]),
        "val/judge_failures": float(s["judge_failures"]),
    }
    if "no_tool" in modes:
        nt = summarize([o for o in outcomes if o.mode == "no_tool"], k)
        out["val/acc_no_tool"] = nt["avg@k"]
        out["val/failed"] += float(nt["failed"])
    return out
