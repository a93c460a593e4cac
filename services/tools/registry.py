"""The tool registry: what a tool is, which tools exist, and the one call path that never raises.

A tool is a stateless class with a registry `name`, an OpenAI function `schema` and
`execute(image, arguments, **options) -> ToolResult`. Adding a tool = one new module in this folder
that decorates its class with `@register`, plus one line in `TOOL_MODULES` below. Pure Python:
no Ray import here (the Serve adapter is `services/tools/app.py`).
"""

from __future__ import annotations

import importlib
import json
from typing import Any, ClassVar

from PIL import Image

from deepeyes.contracts import ToolResult

# One line per tool module; imported lazily on first lookup so that a tool module may import this
# one at its top without a cycle.
TOOL_MODULES = (
    "services.tools.zoom",
    "services.tools.rotate",
)


class Tool:
    """Base class of a tool: a stateless function of (image as the model sees it, arguments)."""

    name: ClassVar[str] = ""
    schema: ClassVar[dict[str, Any]] = {}

    def execute(self, image: Image.Image, arguments: Any, **options: Any) -> ToolResult:
        """Run the tool on `image` (the original in the model's frame) with the model's arguments.

        Bad arguments come back as `ToolResult(ok=False, text=...)`; options a tool does not use
        are ignored.
        """
        raise NotImplementedError


_TOOLS: dict[str, type[Tool]] = {}
_loaded = False


def register(tool_cls: type[Tool]) -> type[Tool]:
    """Class decorator: make `tool_cls` callable by its `name`."""
    if not tool_cls.name or tool_cls.schema.get("function", {}).get("name") != tool_cls.name:
        raise ValueError(f"{tool_cls.__name__}: `name` must be set and equal schema.function.name")
    if _TOOLS.get(tool_cls.name, tool_cls) is not tool_cls:
        raise ValueError(f"two tools named {tool_cls.name!r}: {_TOOLS[tool_cls.name]} and {tool_cls}")
    _TOOLS[tool_cls.name] = tool_cls
    return tool_cls


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for module in TOOL_MODULES:
            importlib.import_module(module)
        _loaded = True


def tool_names() -> list[str]:
    """Names of all registered tools, sorted."""
    _load_all()
    return sorted(_TOOLS)


def get_tool(name: str) -> Tool:
    """The tool registered as `name`; KeyError naming the known tools otherwise."""
    _load_all()
    if name not in _TOOLS:
        raise KeyError(f"unknown tool {name!r} (known: {', '.join(sorted(_TOOLS))})")
    return _TOOLS[name]()


def tool_schemas(names: list[str]) -> list[dict[str, Any]]:
    """The OpenAI function schemas of `names`, in that order (for the system turn's # Tools block)."""
    return [get_tool(n).schema for n in names]


def execute_tool(name: Any, image: Image.Image, arguments: Any, *,
                 min_side_policy: str = "expand", frame_size: tuple[int, int] | None = None,
                 box_scale: str = "absolute") -> ToolResult:
    """Run tool `name`; never raises: an unknown name or any failure is an error text.

    Args:
        name: the tool name from the model's `<tool_call>` (anything: it is checked here).
        image: the original image in the model's frame (never an earlier crop).
        arguments: the call's `arguments` as parsed from JSON (or a JSON string); anything.
        min_side_policy: zoom-in only: `expand` (default) or `reject30` (DeepEyes original).
        frame_size: (w, h) of the model's frame when `image` is the original at another size
            (zoom-in maps the box to it; see services.tools.zoom.crop_image); None = `image` is it.
        box_scale: zoom-in only: the box in `absolute` frame pixels or 0-1000 `relative` (Qwen3-VL).
    """
    _load_all()
    if not isinstance(name, str) or name not in _TOOLS:
        known = ", ".join(sorted(_TOOLS))
        shown = name if isinstance(name, str) else json.dumps(name, default=repr)[:200]
        return ToolResult(False, f"Error: unknown tool {shown[:200]!r}; available tools: {known}.")
    try:
        options: dict[str, Any] = {"min_side_policy": min_side_policy}
        if box_scale != "absolute":
            options["box_scale"] = box_scale
        if frame_size is not None:
            options["frame_size"] = frame_size
        result = _TOOLS[name]().execute(image, arguments, **options)
    except Exception as e:  # a tool bug must not end the episode or the replica
        return ToolResult(False, f"Error processing {name}: {type(e).__name__}: {e}"[:1000])
    if not isinstance(result, ToolResult):
        return ToolResult(False, f"Error processing {name}: the tool returned {type(result).__name__}")
    return result
