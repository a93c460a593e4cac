"""`image_rotate_tool`: rotate the original image (the DeepEyes toolbox's second tool).

Angle semantics: degrees, counter-clockwise, taken modulo 360 (PIL's `Image.rotate` convention,
which the DeepEyes toolbox used). The canvas grows to hold the whole rotated image (`expand=True`,
black fill), so nothing is cut off; multiples of 90 are exact pixel transposes (no resampling).
Like the crop, it always works on the original image in the model's frame, never on an earlier
result.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from PIL import Image

from deepeyes.contracts import ToolResult
from services.tools.registry import CallContext, Tool
from services.tools.zoom import parse_arguments

MALFORMED_TEXT = "Error: angle parameter is missing or not a number (degrees, counter-clockwise)."
SUCCESS_TEXT = "Rotated the image by {angle} degrees counter-clockwise."

_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
              270: Image.Transpose.ROTATE_270}


def rotate_image(image: Image.Image, arguments: Any) -> ToolResult:
    """Rotate `image` by `arguments["angle"]` degrees counter-clockwise; errors as text."""
    args = parse_arguments(arguments)
    angle = args.get("angle") if args is not None else None
    if (isinstance(angle, bool) or not isinstance(angle, numbers.Real)
            or not (isinstance(angle, numbers.Integral) or math.isfinite(angle))):
        return ToolResult(False, MALFORMED_TEXT)
    turn = angle % 360  # exact for ints of any size; a float in [0, 360)
    shown = f"{angle:g}" if isinstance(angle, float) else str(turn if abs(angle) > 10**6 else angle)
    if turn == 0:
        return ToolResult(True, SUCCESS_TEXT.format(angle=shown), image.copy())
    if turn in _TRANSPOSE:
        return ToolResult(True, SUCCESS_TEXT.format(angle=shown), image.transpose(_TRANSPOSE[int(turn)]))
    rotated = image.rotate(float(turn), resample=Image.Resampling.BICUBIC, expand=True)
    return ToolResult(True, SUCCESS_TEXT.format(angle=shown), rotated)


class RotateTool(Tool):
    """The plugin of `image_rotate_tool` (entry in deepeyes/config/tools.yaml): stateless."""

    def execute(self, ctx: CallContext, arguments: Any) -> ToolResult:
        return rotate_image(ctx.image, arguments)
