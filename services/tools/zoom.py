"""`image_zoom_in_tool`: the crop of DeepEyes, rule for rule (docs/design.md, "Crop rules").

The bbox is `[x1, y1, x2, y2]` in absolute pixels of the image as the model sees it (after Qwen
smart-resize; the caller passes that image, `deepeyes.policy.resize_for_model`). Every crop is cut
from that original, never from an earlier crop, at native size. Rules, in order:

1. clamp: left=max(0,x1), top=max(0,y1), right=min(W,x2), bottom=min(H,y2);
2. invalid unless left<right, top<bottom and max(w,h)/min(w,h) <= 100;
3. (policy `expand`) if w<28 or h<28: scale both sides by 28/min(w,h) about the box centre, shrink
   proportionally to fit the image (width first, then height), shift the box inside the image,
   floor left/top and ceil right/bottom;
4. check again (rule 2, and floor-based w and h >= 28), else error;
5. crop at native size. A box that rule 3 left alone is cut at round() of each (clamped, possibly
   fractional) coordinate: that is what PIL's crop does with the float box of the verl port.

Policy `reject30` (the DeepEyes original): no expansion; after the clamp a box is invalid unless
rule 2 holds and both sides are > 30 px.

Deliberate differences from the verl port, all on inputs it mishandles: a bbox whose items are not
finite real numbers (strings, bools, NaN, infinity, nested lists) is "malformed" (the port crashes
in float() or crops garbage); a non-string label is an error; arguments that are not a JSON object
(or a JSON string of one) are an error; the expanded box is clamped to the image after floor/ceil
(float round-off could otherwise make ceil() reach W+1 and cut a black column).
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from PIL import Image

from deepeyes.boxes import box_to_frame, scale_box
from deepeyes.contracts import ToolResult
from services.tools.registry import CallContext, Tool

MIN_SIDE = 28            # the Qwen2.5-VL patch grid (14 px patches, 2x2 merge)
MAX_ASPECT = 100         # rule 2; the image processor itself rejects aspect ratios >= 200
REJECT30_MIN_SIDE = 30   # reject30: sides <= 30 px are rejected
POLICIES = ("expand", "reject30")

# The texts the model reads. The first two and the success texts are the verl port's, word for word.
MALFORMED_TEXT = "Error: bbox_2d parameter is missing or not a list of 4 numbers."
INVALID_TEXT = ("Error: The specified bounding box {bbox} is invalid or results in a crop smaller "
                "than the minimum size of 28x28.")
INVALID_REJECT30_TEXT = ("Error: The specified bounding box {bbox} is invalid or has a side of 30 "
                         "pixels or less (the minimum is 31x31).")
NOT_OBJECT_TEXT = ('Error: the arguments must be a JSON object such as '
                   '{"bbox_2d": [x1, y1, x2, y2], "label": "object"}.')
LABEL_TEXT = "Error: label must be a string (the name of the object in the box) or left out."
SUCCESS_TEXT = "Zoomed in on the image to the region {bbox}."
SUCCESS_LABEL_TEXT = "Zoomed in on the image to the region {bbox} with label {label}."

Box = tuple[float, float, float, float]


def _is_number(v: Any) -> bool:
    """A finite real number (JSON ints of any size count; bools, NaN and infinities do not)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return False
    return isinstance(v, numbers.Integral) or math.isfinite(v)


def _valid(left: float, top: float, right: float, bottom: float) -> bool:
    """Rule 2: a non-empty box with max(w,h)/min(w,h) <= 100."""
    if not (left < right and top < bottom):
        return False
    w, h = right - left, bottom - top
    if min(w, h) <= 0:  # cannot happen for finite floats in range; kept as a guard
        return False
    return max(w, h) / min(w, h) <= MAX_ASPECT


def _expand(left: float, top: float, right: float, bottom: float, W: int, H: int) -> Box | None:
    """Rule 3: grow a box with a side < 28 to a short side of 28 about its centre, inside the image."""
    w, h = right - left, bottom - top
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    ratio = MIN_SIDE / min(w, h)
    tw, th = w * ratio, h * ratio
    if not (math.isfinite(tw) and math.isfinite(th)):
        return None  # a sub-normal side: 28/min overflows
    if tw > W:  # too large for the image: shrink proportionally, width first, then height
        th *= W / tw
        tw = W
    if th > H:
        tw *= H / th
        th = H
    new_left, new_top = cx - tw / 2.0, cy - th / 2.0
    if new_left < 0:  # shift inside, keeping the size
        new_left = 0
    if new_top < 0:
        new_top = 0
    if new_left + tw > W:
        new_left = W - tw
    if new_top + th > H:
        new_top = H - th
    return (max(0, math.floor(new_left)), max(0, math.floor(new_top)),
            min(W, math.ceil(new_left + tw)), min(H, math.ceil(new_top + th)))


def zoom_box(bbox: list[Any], width: int, height: int, min_side_policy: str = "expand") -> tuple[int, int, int, int] | None:
    """The integer crop box for `bbox` on a `width` x `height` image, or None when it is invalid.

    Args:
        bbox: four finite real numbers `[x1, y1, x2, y2]` (checked by the caller).
        width: image width W in the model's frame.
        height: image height H in the model's frame.
        min_side_policy: `expand` (rules 1-4) or `reject30` (clamp, rule 2, sides > 30).
    """
    x1, y1, x2, y2 = bbox
    # Rule 1. Compare before converting to float: a JSON int may be too large for a float.
    left, top, right, bottom = max(0, x1), max(0, y1), min(width, x2), min(height, y2)
    if not (left < right and top < bottom):
        return None
    left, top, right, bottom = float(left), float(top), float(right), float(bottom)
    if not _valid(left, top, right, bottom):  # rule 2
        return None
    w, h = right - left, bottom - top
    if min_side_policy == "reject30":
        if min(w, h) <= REJECT30_MIN_SIDE:
            return None
        box: Box = (left, top, right, bottom)
    elif w < MIN_SIDE or h < MIN_SIDE:
        expanded = _expand(left, top, right, bottom, width, height)  # rule 3
        if expanded is None:
            return None
        box = expanded
    else:
        box = (left, top, right, bottom)
    # Rule 4: the same checks again, and the floor-based sides must reach 28.
    if not _valid(*box):
        return None
    if math.floor(box[2]) - math.floor(box[0]) < MIN_SIDE or math.floor(box[3]) - math.floor(box[1]) < MIN_SIDE:
        return None
    # Rule 5 cuts at round() of each coordinate, as PIL's crop does with a float box.
    return round(box[0]), round(box[1]), round(box[2]), round(box[3])


def _shown(bbox: list[Any]) -> str:
    """The bbox as the model gave it (Python list repr, as the verl port prints it), capped."""
    try:
        text = repr(bbox)
    except ValueError:  # an int beyond Python's int->str digit limit
        return "[a bbox with numbers too long to print]"
    return text if len(text) <= 300 else text[:297] + "..."


def parse_arguments(arguments: Any) -> dict[str, Any] | None:
    """The call's arguments as a dict: a dict as is, a JSON string of an object decoded; else None."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    return arguments if isinstance(arguments, dict) else None


def map_box(box: tuple[int, int, int, int], frame_size: tuple[int, int],
            image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box in the model frame (`frame_size` = (w, h)) -> the same region on an image of
    `image_size`: each side scaled by image/frame, left/top floored, right/bottom ceiled, clamped."""
    W, H = image_size
    x1, y1, x2, y2 = scale_box(box, frame_size, image_size)
    return max(0, math.floor(x1)), max(0, math.floor(y1)), min(W, math.ceil(x2)), min(H, math.ceil(y2))


def crop_image(image: Image.Image, arguments: Any, *, min_side_policy: str = "expand", box_scale: str = "absolute",
               frame_size: tuple[int, int] | None = None) -> ToolResult:
    """Zoom in: crop `image` (the original, in the model's frame) to the model's bbox.

    Args:
        image: the original image as the model sees it (smart-resized by the caller); with
            `frame_size`, the original at any resolution (e.g. the full-size benchmark image).
        arguments: the call's arguments, `{"bbox_2d": [x1, y1, x2, y2], "label": "..."}`, as parsed
            from the model's JSON (or the JSON string itself). Anything else is an error text.
        min_side_policy: `expand` (default: grow boxes under 28 px) or `reject30`.
        frame_size: (w, h) of the frame the model saw, when `image` is not that frame: the rules
            run on the box in the frame exactly as without it, then the resulting box is mapped to
            `image` (`map_box`) and cut from it there, so a downscaled high-resolution image is
            cropped at full detail (evaluation's opt-in; training crops the frame itself).

    Returns:
        ToolResult with the crop at native size and the success text, or ok=False and the error.

    Raises:
        ValueError: `min_side_policy` is not one of `expand`, `reject30` (a configuration bug).
    """
    if min_side_policy not in POLICIES:
        raise ValueError(f"min_side_policy {min_side_policy!r} is not one of {POLICIES} "
                         f"(set tools.min_side_policy)")
    args = parse_arguments(arguments)
    if args is None:
        return ToolResult(False, NOT_OBJECT_TEXT)
    bbox = args.get("bbox_2d")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return ToolResult(False, MALFORMED_TEXT)
    label = args.get("label")
    if label is not None and not isinstance(label, str):
        return ToolResult(False, LABEL_TEXT)
    bbox = list(bbox)
    fw, fh = (image.width, image.height) if frame_size is None else (int(frame_size[0]), int(frame_size[1]))
    if fw <= 0 or fh <= 0:
        return ToolResult(False, f"Error: the model frame size {frame_size!r} is not positive.")
    if box_scale not in ("absolute", "relative"):
        raise ValueError(f"box_scale {box_scale!r} is not absolute or relative (set tools.box_scale)")
    # A relative box (0-1000 per side, Qwen3-VL's) becomes frame pixels first; every rule then applies
    # in pixels, the 28 px minimum included. The texts show the box as the model wrote it.
    box = zoom_box(box_to_frame(bbox, (fw, fh), box_scale), fw, fh, min_side_policy)
    if box is None:
        text = INVALID_REJECT30_TEXT if min_side_policy == "reject30" else INVALID_TEXT
        return ToolResult(False, text.format(bbox=_shown(bbox)))
    if frame_size is not None:
        box = map_box(box, (fw, fh), image.size)
    crop = image.crop(box)
    # The processor rejects aspect ratios >= 200; rule 2 caps boxes at 100, this guards the cut.
    if min(crop.size) < 1 or max(crop.size) / min(crop.size) >= 200:
        return ToolResult(False, INVALID_TEXT.format(bbox=_shown(bbox)))
    if label:
        return ToolResult(True, SUCCESS_LABEL_TEXT.format(bbox=_shown(bbox), label=label), crop)
    return ToolResult(True, SUCCESS_TEXT.format(bbox=_shown(bbox)), crop)


class ZoomInTool(Tool):
    """The plugin of `image_zoom_in_tool` (entry in deepeyes/config/tools.yaml): stateless."""

    def execute(self, ctx: CallContext, arguments: Any) -> ToolResult:
        o = ctx.options
        return crop_image(ctx.image, arguments, min_side_policy=o.get("min_side_policy", "expand"),
                          frame_size=o.get("frame_size"), box_scale=o.get("box_scale", "absolute"))
