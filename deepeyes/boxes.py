"""Boxes between the model's frame and the stored image: the one place a box changes scale.

The model writes its zoom box in the pixels of the frame it saw (the original smart-resized for the
model); the data row's target box is in the stored image's pixels. `box_scale` is the factor from
one size to the other, `scale_box` applies it; the tool's integer pixel region
(services/tools/zoom.py, `map_box`), the cold start's taught box, the metrics' target box and the
validation's grounding all go through these. Pure Python.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def box_scale(src_size: Sequence[float], dst_size: Sequence[float]) -> tuple[float, float]:
    """(sx, sy): what a length along x and along y in an image of `src_size` (w, h) is multiplied
    by to be the same length in an image of `dst_size`."""
    return dst_size[0] / src_size[0], dst_size[1] / src_size[1]


def scale_box(box: Sequence[float], src_size: Sequence[float], dst_size: Sequence[float]) -> list[float]:
    """`box` = [x1, y1, x2, y2] in an image of `src_size` -> the same region in one of `dst_size`."""
    sx, sy = box_scale(src_size, dst_size)
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


RELATIVE_SIDE = 1000.0  # a relative box (Qwen3-VL's) runs 0..1000 along each side of the frame


def box_to_frame(box: Sequence[float], frame_size: Sequence[float], box_scale: str) -> list[float]:
    """A box as the model wrote it -> model-frame pixels: `absolute` is already that, `relative`
    (0-1000 per side, what Qwen3-VL checkpoints write) is scaled to the frame's sides."""
    if box_scale == "relative":
        return scale_box(box, (RELATIVE_SIDE, RELATIVE_SIDE), frame_size)
    return list(box)  # as given: the tool's rules handle any number (an int past float range included)


def box_from_frame(box: Sequence[float], frame_size: Sequence[float], box_scale: str) -> list[int]:
    """Model-frame pixels -> the integer box the model would write under `box_scale`."""
    if box_scale == "relative":
        return [round(v) for v in scale_box(box, frame_size, (RELATIVE_SIDE, RELATIVE_SIDE))]
    return [round(v) for v in box]


def parse_box(arguments: Any) -> list[float] | None:
    """A tool call's `bbox_2d` as 4 finite floats (model-frame pixels, as the model wrote it), else None."""
    box = arguments.get("bbox_2d") if isinstance(arguments, dict) else None
    if not isinstance(box, (list, tuple)) or len(box) != 4 or any(isinstance(v, bool) for v in box):
        return None
    try:
        out = [float(v) for v in box]
    except (TypeError, ValueError, OverflowError):
        return None
    return out if all(math.isfinite(v) for v in out) else None
