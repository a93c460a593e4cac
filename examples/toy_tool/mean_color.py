"""A toy tool, to show what adding one takes: this module and one entry in `tools.yaml` beside it.

`image_mean_color` answers the mean RGB of a region of the image (a box in the model's frame, or
the whole image). Turn it on in a scenario:

    tools:
      registry_files: [examples/toy_tool/tools.yaml]
      enabled: [image_zoom_in_tool, image_mean_color]
"""

from __future__ import annotations

from typing import Any

from PIL import ImageStat

from deepeyes.contracts import ToolResult
from services.tools.registry import CallContext, Tool


class MeanColorTool(Tool):
    """Stateless: the mean colour of `arguments["bbox_2d"]` (optional) of the episode's image."""

    def execute(self, ctx: CallContext, arguments: Any) -> ToolResult:
        image = ctx.image
        if image is None:
            return ToolResult(False, "Error: this episode has no image.")
        box = arguments.get("bbox_2d") if isinstance(arguments, dict) else None
        if box is not None:
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                return ToolResult(False, "Error: bbox_2d must be [x1, y1, x2, y2] in pixels.")
            x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
            x2, y2 = min(image.width, int(box[2])), min(image.height, int(box[3]))
            if x2 <= x1 or y2 <= y1:
                return ToolResult(False, "Error: the box is empty inside the image.")
            image = image.crop((x1, y1, x2, y2))
        digits = int(self.config.get("digits", 1))
        mean = [round(v, digits) for v in ImageStat.Stat(image.convert("RGB")).mean]
        return ToolResult(True, f"The mean colour is RGB({mean[0]}, {mean[1]}, {mean[2]}).")
