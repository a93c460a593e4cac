"""`python`: DeepEyesV2's code tool, a stateful kernel per trajectory (docs/design.md, "Tool plugins").

The model writes `<code>```python ...```</code>`; the code runs in the trajectory's own kernel
(services/tools/sandbox/: isolated process, state kept across that trajectory's turns only), with
the episode's image bound as `image_1`. The result returns as DeepEyesV2 returns it: "Code
execution result:" with fenced stdout and stderr, then the figures the code drew (`plt.show()`
or any open figure) and the images it passed to `show(...)`, capped.

What the model is told when the kernel could not finish: a timeout, a memory cap or a crash is an
error result naming it (the episode goes on); the kernel is then replaced and the next call says
its state is gone.
"""

from __future__ import annotations

import tempfile
from typing import Any

from PIL import Image

from deepeyes.contracts import ToolResult
from deepeyes.images import ImageDecodeError, decode_image, encode_png
from deepeyes.toolspec import ToolSpec
from services.tools.registry import CallContext, Tool
from services.tools.sandbox.pool import KernelPool, SandboxLimits

CODE_RESULT = "Code execution result:\nstdout:\n```\n{stdout}\n```\n\nstderr:\n```\n{stderr}\n```\n\n"
STOPPED = {
    "timeout": "Error: the code ran past the {timeout:g} s limit and was stopped; the kernel was restarted, "
               "so earlier variables are gone. Write code that finishes quickly.",
    "memory": "Error: the code went over the {memory} MB memory limit; the kernel was restarted, so earlier "
              "variables are gone.",
    "lost": "Error: the kernel of this trajectory is gone (it crashed or was stopped); a new one starts with "
            "the next call, without earlier variables.",
    "killed": "Error: the code was stopped (the call was cancelled); the kernel was restarted.",
}
KEPT = "variables are kept"  # the pool's stderr note when an interrupt stopped the code and the kernel lives
MAX_IMAGE_PIXELS = 16_000_000  # a figure the kernel returns is decoded only under this many pixels
RESTARTED_NOTE = "Note: the kernel was restarted before this call; earlier variables are gone.\n"


class PythonTool(Tool):
    """The plugin of `python` (entry in deepeyes/config/tools.yaml): one KernelPool per replica.

    Config (the entry's `config`, tools.settings.python.config): timeout_s, memory_mb,
    max_processes, max_images, max_output_chars, spares, ttl_s, root.
    """

    def __init__(self, spec: ToolSpec) -> None:
        super().__init__(spec)
        c = self.config
        self.timeout_s = float(c.get("timeout_s", 8.0))
        self.limits = SandboxLimits(memory_mb=int(c.get("memory_mb", 1024)),
                                    max_processes=int(c.get("max_processes", 32)),
                                    max_stdout_chars=int(c.get("max_output_chars", 8000)),
                                    max_images=int(c.get("max_images", 10)))
        self.pool = KernelPool(c.get("root") or tempfile.gettempdir(), self.limits,
                               spares=int(c.get("spares", 2)), ttl_s=float(c.get("ttl_s", 900)))

    def create(self, ctx: CallContext) -> None:
        png = encode_png(ctx.image) if isinstance(ctx.image, Image.Image) else None
        self.pool.create(ctx.instance_id, png)

    def execute(self, ctx: CallContext, arguments: Any) -> ToolResult:
        code = arguments.get("code") if isinstance(arguments, dict) else None
        if not isinstance(code, str) or not code.strip():
            return ToolResult(False, "Error: no code to run. Write <code>\n```python\n...\n```\n</code>.", status="error")
        res = self.pool.execute(ctx.instance_id, code, self.timeout_s)
        metrics = {"exec_s": res.duration_s, "restarted": float(res.restarted)}
        if res.status == "timeout" and KEPT in res.stderr:  # the interrupt worked: the kernel and its state live on
            text = CODE_RESULT.format(stdout=res.stdout.rstrip("\n"), stderr=res.stderr.rstrip("\n"))
            return ToolResult(False, text, status="timeout", metrics=metrics)
        if res.status in STOPPED:
            text = STOPPED[res.status].format(timeout=self.timeout_s, memory=self.limits.memory_mb)
            return ToolResult(False, text, status=res.status, metrics=metrics)
        images = []
        for png in res.images[:self.limits.max_images]:
            try:
                images.append(decode_image(png, max_pixels=MAX_IMAGE_PIXELS))
            except ImageDecodeError:  # a figure too large or unreadable is left out, said in stderr
                res.stderr += "\n[a figure was left out: over the pixel cap or unreadable]"
        text = (RESTARTED_NOTE if res.restarted else "") + CODE_RESULT.format(
            stdout=res.stdout.rstrip("\n"), stderr=res.stderr.rstrip("\n"))
        return ToolResult(res.status == "ok", text, images=images, status=res.status, metrics=metrics)

    def release(self, instance_id: str) -> None:
        self.pool.release(instance_id)

    def cancel(self, instance_id: str) -> None:
        self.pool.cancel(instance_id)

    def sweep(self) -> int:
        return self.pool.sweep()

    def health(self) -> None:
        stats = self.pool.stats()
        if stats.get("broken"):
            raise RuntimeError(f"the kernel pool cannot start kernels: {stats['broken']}")

    def stats(self) -> dict[str, Any]:
        return {**self.pool.stats(), "isolation": dict(self.pool.isolation)}

    def close(self) -> None:
        self.pool.close()

