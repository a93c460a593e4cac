"""The Serve host of plugin tools (docs/design.md, "Tool plugins"): one deployment per registry
`deployment` name other than ToolService (PythonSandbox, SearchService, or a user's own).

In-cluster only (no HTTP route: a stateful tool's instance belongs to a trajectory of the rollout):

    await handle.options(multiplexed_model_id=instance_id).call.remote(
        name, image_arg(ref), arguments, instance_id=..., row_id=..., fresh=...)
    await handle.options(multiplexed_model_id=instance_id).release.remote(name, instance_id)

The instance id travels as Serve's multiplexed model id, so the calls of one trajectory go to the
replica that holds its instance (Serve routes a model id to a replica that has it loaded).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import ray
from ray import serve
from ray.util import metrics

from deepeyes.contracts import ToolResult
from deepeyes.toolspec import ToolSpec
from services.tools.registry import CallContext, Tool, load_tool, run_call

SWEEP_EVERY_S = 30.0  # how often idle instances are looked for (each tool applies its own TTL)
RESTART_NOTE = ("Note: this tool's state was lost (its worker restarted); variables and files from "
                "earlier calls are gone, image_1 is bound again.\n")
MAX_PINNED = 100_000  # instance ids a replica remembers for routing (a few bytes each)


class _Pin:
    """What the multiplexer holds per instance id: nothing but the routing fact."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id


class ToolMetrics:
    """Per-tool calls, outcomes and latency on the Ray metrics endpoint (the dashboard's panels)."""

    def __init__(self, deployment: str) -> None:
        keys = ("tool", "outcome")
        self.calls = metrics.Counter("tool_calls", description="tool calls by tool and outcome "
                                     "(ok, error, timeout, memory, lost, killed)", tag_keys=keys)
        self.latency = metrics.Histogram("tool_latency_s", description="tool call latency in the host",
                                         boundaries=[0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30], tag_keys=("tool",))
        self.live = metrics.Gauge("tool_live_instances", description="instances held by a tool host",
                                  tag_keys=("tool",))
        self.deployment = deployment
        self.counts: dict[str, dict[str, int]] = {}

    def record(self, tool: str, outcome: str, seconds: float) -> None:
        self.calls.inc(1, tags={"tool": tool, "outcome": outcome})
        self.latency.observe(seconds, tags={"tool": tool})
        per = self.counts.setdefault(tool, {})
        per[outcome] = per.get(outcome, 0) + 1


async def _resolve(image: Any) -> Any:
    """`image_arg(ref)` -> the object (PIL image); anything else as given."""
    if isinstance(image, (list, tuple)) and len(image) == 1 and isinstance(image[0], ray.ObjectRef):
        return await image[0]
    return image


# Helpers above: Serve pickles the class by value at decoration (tests/unit/test_deployment_pickles.py).
@serve.deployment
class ToolHost:
    """Hosts the plugin tools of one deployment name, each instance in one replica.

    Invariant: every call is answered with a ToolResult and none takes the replica down (a tool's
    exception is an error result); an instance lives in the replica that created it until its
    trajectory releases it, its caller cancels a call (the tool stops it), or its TTL passes; a call
    for an instance this replica does not hold, after the first, gets a fresh one and says so
    (its worker restarted: the state is gone, never silently).
    """

    def __init__(self, specs: list[ToolSpec]) -> None:
        self.tools: dict[str, Tool] = {s.name: load_tool(s) for s in specs}
        self.specs = {s.name: s for s in specs}
        self.instances: dict[tuple[str, str], float] = {}  # (tool, instance id) -> last use
        self.metrics = ToolMetrics(specs[0].deployment if specs else "")
        self._sweeper: asyncio.Task | None = None

    @serve.multiplexed(max_num_models_per_replica=MAX_PINNED)
    async def _pin(self, instance_id: str) -> _Pin:
        return _Pin(instance_id)

    async def call(self, name: str, image: Any, arguments: Any, *, instance_id: str = "", row_id: str = "",
                   fresh: bool = True, frame_size: tuple[int, int] | None = None) -> ToolResult:
        """Run tool `name` for the trajectory's instance; never raises (see the class invariant)."""
        self._start_sweeper()
        t0 = time.perf_counter()
        tool = self.tools.get(name)
        try:
            result = await self._call(tool, name, image, arguments, instance_id, row_id, fresh, frame_size)
        except asyncio.CancelledError:  # the caller timed out: stop the running code now
            if tool is not None and instance_id:
                await asyncio.to_thread(tool.cancel, instance_id)
                self.instances.pop((name, instance_id), None)
            self.metrics.record(name, "killed", time.perf_counter() - t0)
            raise
        except Exception as e:  # the invariant: nothing escapes
            result = ToolResult(False, f"Error processing {name}: {type(e).__name__}: {e}"[:1000], status="error")
        self.metrics.record(name if tool is not None else "unknown", result.outcome, time.perf_counter() - t0)
        return result

    async def _call(self, tool: Tool | None, name: str, image: Any, arguments: Any, instance_id: str,
                    row_id: str, fresh: bool, frame_size: tuple[int, int] | None) -> ToolResult:
        if instance_id:
            await self._pin(instance_id)
        image = await _resolve(image)
        options: dict[str, Any] = {"row_id": row_id}
        if frame_size is not None:
            options["frame_size"] = frame_size
        ctx = CallContext(instance_id=instance_id, image=image, options=options)
        restarted = False
        if tool is not None and self.specs[name].stateful and (name, instance_id) not in self.instances:
            await asyncio.to_thread(tool.create, ctx)
            restarted = not fresh
        if tool is not None and instance_id:
            self.instances[(name, instance_id)] = time.monotonic()
        result = await asyncio.to_thread(run_call, tool, name, ctx, arguments, sorted(self.tools))
        if restarted:
            result.text = RESTART_NOTE + result.text
            result.metrics["restarted"] = 1.0
        return result

    async def release(self, name: str, instance_id: str) -> None:
        """Free the trajectory's instance of `name` (idempotent)."""
        tool = self.tools.get(name)
        self.instances.pop((name, instance_id), None)
        if tool is not None:
            await asyncio.to_thread(tool.release, instance_id)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            for name, tool in self.tools.items():
                ttl = float(tool.config.get("ttl_s", 0) or 0)
                if ttl > 0:
                    now = time.monotonic()
                    stale = [iid for (n, iid), t in self.instances.items() if n == name and now - t > ttl]
                    for iid in stale:
                        await self.release(name, iid)
                await asyncio.to_thread(tool.sweep)
                self.metrics.live.set(sum(1 for (n, _) in self.instances if n == name), tags={"tool": name})

    async def stats(self) -> dict[str, Any]:
        """Counters of this replica: per-tool outcomes, the tools' own stats, the pid (chaos tests)."""
        ctx = serve.get_replica_context()
        return {"pid": os.getpid(), "replica": ctx.replica_id.unique_id, "outcomes": self.metrics.counts,
                "instances": len(self.instances),
                "tools": {n: await asyncio.to_thread(t.stats) for n, t in self.tools.items()}}

    def check_health(self) -> None:
        """Serve's periodic probe: every hosted tool must say it can serve."""
        for tool in self.tools.values():
            tool.health()

    def __del__(self) -> None:
        for tool in getattr(self, "tools", {}).values():
            try:
                tool.close()
            except Exception:  # the replica is going away: close what can be closed
                pass

