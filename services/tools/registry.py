"""The tool plugin interface (docs/design.md, "Tool plugins"): what a tool class is, and the one
call path that never raises.

A tool is a class named by one entry of the registry YAML (`deepeyes/toolspec.py`): adding a tool
is one module with a `Tool` subclass plus one YAML entry, nothing else. Its lifecycle, per
trajectory (the caller owns the instance id, fresh for every trajectory):

    create(ctx)              before the trajectory's first call (stateful tools: start a kernel)
    execute(ctx, arguments)  each call -> ToolResult (text, images, status, metrics)
    release(instance_id)     when the trajectory ends, whatever way it ends (idempotent)
    cancel(instance_id)      the caller gave up on a running call (timeout): stop it now

A stateless tool (the zoom, the rotate) implements `execute` only. Pure Python: no Ray import here
(the Serve host is `services/tools/app.py`).
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from deepeyes.contracts import ToolResult
from deepeyes.toolspec import ToolSpec, load_specs


@dataclass
class CallContext:
    """What a call knows besides the model's arguments.

    Attributes:
        instance_id: the trajectory's instance of this tool ("" for a one-off call).
        image: the episode's first image, in the model's frame unless `options["frame_size"]` says
            it is the original at another size; None for an episode without images.
        options: per-call settings a tool may read: min_side_policy, frame_size, box_scale (zoom),
            row_id (image_search's replay key); tools ignore the ones they do not use.
    """

    instance_id: str = ""
    image: Image.Image | None = None
    options: dict[str, Any] = field(default_factory=dict)


class Tool:
    """Base class of a tool (see the module docstring for the lifecycle).

    The constructor gets the registry entry; `self.config` is its `config` mapping (merged with
    the scenario's tools.settings). One instance serves every trajectory of its replica, so
    per-trajectory state lives behind the instance id, never on the class or the instance itself.
    """

    def __init__(self, spec: ToolSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.config = dict(spec.config)

    @property
    def schema(self) -> dict[str, Any] | None:
        return self.spec.schema

    def create(self, ctx: CallContext) -> None:
        """Prepare the trajectory's instance (stateless tools: nothing)."""

    def execute(self, ctx: CallContext, arguments: Any) -> ToolResult:
        """Run one call with the model's arguments (anything: the tool checks them); errors the
        model can fix come back as `ToolResult(ok=False, text=...)`."""
        raise NotImplementedError

    def release(self, instance_id: str) -> None:
        """Free the trajectory's instance; idempotent, never raises on an unknown id."""

    def cancel(self, instance_id: str) -> None:
        """Stop a running call of this instance (its caller timed out); the default is release."""
        self.release(instance_id)

    def health(self) -> None:
        """Raise when the tool cannot serve (Serve's health probe calls it)."""

    def sweep(self) -> int:
        """Free what outlived its owner (the host calls it every SWEEP_EVERY_S); returns the count."""
        return 0

    def stats(self) -> dict[str, Any]:
        """Counters for the dashboard and tests (kills, live instances, ...)."""
        return {}

    def close(self) -> None:
        """The replica is going away: release everything."""


class ToolLoadError(TypeError):
    """A registry entry whose class cannot be imported or is not a Tool."""


def load_tool(spec: ToolSpec) -> Tool:
    """An instance of the entry's class, constructed with the entry."""
    module, cls_name = spec.cls.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as e:
        raise ToolLoadError(f"tool {spec.name!r} ({spec.source}): class {spec.cls} cannot be imported "
                            f"({type(e).__name__}: {e})") from e
    if not (isinstance(cls, type) and issubclass(cls, Tool)):
        raise ToolLoadError(f"tool {spec.name!r}: {spec.cls} is not a services.tools.registry.Tool subclass")
    return cls(spec)


def run_call(tool: Tool | None, name: Any, ctx: CallContext, arguments: Any, known: list[str]) -> ToolResult:
    """One call of `tool` (None: the name is unknown); never raises: failures become error texts."""
    if tool is None:
        shown = name if isinstance(name, str) else json.dumps(name, default=repr)[:200]
        return ToolResult(False, f"Error: unknown tool {shown[:200]!r}; available tools: {', '.join(known)}.",
                          status="error")
    try:
        result = tool.execute(ctx, arguments)
    except Exception as e:  # a tool bug must not end the episode or the replica
        return ToolResult(False, f"Error processing {tool.name}: {type(e).__name__}: {e}"[:1000], status="error")
    if not isinstance(result, ToolResult):
        return ToolResult(False, f"Error processing {tool.name}: the tool returned {type(result).__name__}",
                          status="error")
    return result


@functools.lru_cache(maxsize=1)
def _builtin_image_tools() -> dict[str, Tool]:
    """The built-in stateless tools of the image deployment (for in-process callers: the cold start,
    the perception probes, tests): loaded once, shared."""
    return {s.name: load_tool(s) for s in load_specs().values() if s.deployment == "ToolService"}


def tool_names() -> list[str]:
    """Names of the built-in image tools (hosted by ToolService), sorted."""
    return sorted(_builtin_image_tools())


def get_tool(name: str) -> Tool:
    """The built-in image tool registered as `name`; KeyError naming the known tools otherwise."""
    tools = _builtin_image_tools()
    if name not in tools:
        raise KeyError(f"unknown tool {name!r} (known: {', '.join(sorted(tools))})")
    return tools[name]


def tool_schemas(names: list[str]) -> list[dict[str, Any]]:
    """The OpenAI function schemas of `names`, in that order (for the system turn's # Tools block)."""
    return [get_tool(n).schema for n in names]  # type: ignore[misc]


def execute_tool(name: Any, image: Image.Image, arguments: Any, *,
                 min_side_policy: str = "expand", frame_size: tuple[int, int] | None = None,
                 box_scale: str = "absolute") -> ToolResult:
    """Run the built-in image tool `name` once, in process; never raises.

    Args:
        name: the tool name from the model's `<tool_call>` (anything: it is checked here).
        image: the original image in the model's frame (never an earlier crop).
        arguments: the call's `arguments` as parsed from JSON (or a JSON string); anything.
        min_side_policy: zoom-in only: `expand` (default) or `reject30` (DeepEyes original).
        frame_size: (w, h) of the model's frame when `image` is the original at another size
            (zoom-in maps the box to it; see services.tools.zoom.crop_image); None = `image` is it.
        box_scale: zoom-in only: the box in `absolute` frame pixels or 0-1000 `relative` (Qwen3-VL).
    """
    tools = _builtin_image_tools()
    options: dict[str, Any] = {"min_side_policy": min_side_policy, "box_scale": box_scale}
    if frame_size is not None:
        options["frame_size"] = frame_size
    tool = tools.get(name) if isinstance(name, str) else None
    return run_call(tool, name, CallContext(image=image, options=options), arguments, sorted(tools))
