"""Ray Serve adapter of the tool service: in-cluster handle calls and an HTTP route, one deployment.

In-cluster (the rollout): `await handle.call.remote(name, [image_ref], arguments)` -> ToolResult
with the PIL crop itself (no re-encode). The image is the original in the model's frame
(`deepeyes.policy.resize_for_model`), put in the object store once per episode. Pass the ref
WRAPPED in a one-element list (`image_arg(ref)`): Ray resolves ObjectRefs given as top-level
arguments before the replica sees them (measured on Ray 2.60), which deserializes the whole image
on every call; wrapped, the replica resolves it itself and keeps it in a per-replica cache keyed
by the ref, so the turns of an episode fetch it once. A bare ref, a PIL image or encoded bytes
(size-checked from the header before decoding) also work.

HTTP (outside the cluster; for trusted networks, optional bearer token):
    POST {prefix}/{name}  {"image": base64, "arguments": {...}, "resize": {min_pixels, max_pixels}?}
                          -> {"ok": bool, "text": str, "image": base64 PNG | null}
    GET  {prefix}/        -> the tool schemas (`GET {prefix}` redirects there, 307)
    GET  {prefix}/healthz -> {"status": "ok"} (no token needed)
The HTTP image is the image as the model saw it (the bbox is in its pixels); with `resize` the
service smart-resizes it first (Qwen's rule, `deepeyes.policy.resize_for_model`). Status codes:
200 for every answered call (ok true or false), 400 bad body or image, 401 token, 404 unknown
tool, 413 over a size cap, 504 timeout; error bodies have the same shape, with ok=false.
"""


import asyncio
import base64
import contextlib
import dataclasses
import os
import threading
from collections import OrderedDict
from typing import Any, AsyncIterator, Literal

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ValidationError
from ray import serve

from deepeyes.config import ConfigError, DeploymentConfig, ToolsConfig
from deepeyes.contracts import ToolResult
from deepeyes.images import (ImageDecodeError, ImageTooLargeError, decode_base64_image, decode_image, encode_png,
                             trim_freed_memory)
from deepeyes.serving import authorized, bearer_token, config_from_args, deployment_options, read_body_capped
from deepeyes.toolspec import ToolSpec, load_specs, specs_for
from services.tools.host import ToolHost
from services.tools.registry import CallContext, Tool, load_tool, run_call


def resizer() -> Any:
    """`deepeyes.policy.resize_for_model`, imported on first use (defined before the deployment
    class: Serve pickles the class, and what it calls, as the module is first run)."""
    from deepeyes.policy import resize_for_model  # imports torch and transformers: only a resize asks for it

    return resize_for_model


class ResizeSpec(BaseModel):
    """Smart-resize bounds for an HTTP image not yet in the model's frame."""

    min_pixels: int
    max_pixels: int
    factor: Literal[28, 32] = 28  # the policy family's grid: 28 px (Qwen2.5-VL) or 32 px (Qwen3-VL)


class ToolRequest(BaseModel):
    """Body of `POST /tools/{name}`."""

    image: str  # base64 (or a data: URL) of the image as the model sees it
    arguments: Any = None  # the model's arguments object; validated by the tool, never here
    resize: ResizeSpec | None = None


class ToolResponse(BaseModel):
    """Answer of `POST /tools/{name}`: ok, the one-line text, the produced image as base64 PNG."""

    ok: bool
    text: str
    image: str | None = None


class ImageCache:
    """LRU of decoded images keyed by object-ref id, bounded by their raw size in bytes.

    An ObjectRef names an immutable object, so a cached image never goes stale.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Image.Image] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0

    @staticmethod
    def _size(image: Image.Image) -> int:
        return image.width * image.height * len(image.getbands())

    def get(self, key: str) -> Image.Image | None:
        with self._lock:
            image = self._items.get(key)
            if image is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return image

    def put(self, key: str, image: Image.Image) -> None:
        size = self._size(image)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = image
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)


app = FastAPI(title="deepeyes tools", description="Image tools of the DeepEyes agent loop. "
              "For trusted networks: protect it with a bearer token (serve.auth_token_env).")


def _json(status: int, ok: bool, text: str, image: str | None = None) -> JSONResponse:
    return JSONResponse(ToolResponse(ok=ok, text=text, image=image).model_dump(), status_code=status)


def image_specs(tools: ToolsConfig) -> list[ToolSpec]:
    """Every registered tool of the ToolService deployment (enabled or not: HTTP callers use them all)."""
    return [s for s in load_specs(tuple(tools.registry_files), tools.settings).values() if s.deployment == "ToolService"]


# Defined above the deployment: Serve pickles the class by value when it is decorated, so a helper
# defined below it is missing in the replica (NameError at start).
@serve.deployment
@serve.ingress(app)
class ToolService:
    """Stateless image tools behind a handle and HTTP.

    Invariant: every request is answered and none can take the replica down: bad arguments,
    unknown tool names, undecodable or oversized images (and, on HTTP, timeouts) all come back as
    `ToolResult(ok=False, text=...)` (HTTP: the same shape with a 4xx/5xx code), and image pixels
    are decoded only after the encoded size and the header's pixel count pass their caps. The
    only state is a cache of immutable images keyed by object ref.
    """

    def __init__(self, tools: ToolsConfig, token: str | None = None, specs: list[ToolSpec] | None = None,
                 *plugin_hosts: Any):
        self.cfg = tools
        # the image tools this deployment hosts (the registry entries with deployment ToolService);
        # plugin_hosts are the app's other deployments (ToolHost), bound here so they deploy with it
        specs = specs if specs is not None else image_specs(tools)
        self._tools: dict[str, Tool] = {s.name: load_tool(s) for s in specs}
        if "image_zoom_in_tool" not in self._tools:  # the health probe's tool
            self._tools["image_zoom_in_tool"] = load_tool(specs_for(dataclasses.replace(tools, enabled=[
                "image_zoom_in_tool"], registry_files=[], settings={}))[0])
        self._plugin_hosts = plugin_hosts
        # the builder resolves auto from the policy family (build_app); a bare ToolsConfig means pixels
        self.box_scale = "absolute" if tools.box_scale == "auto" else tools.box_scale
        self._token = token
        self._cache = ImageCache(tools.image_cache_mb * 1024 * 1024)
        self.calls = 0
        self.errors = 0
        self.timeouts = 0
        self._probe = Image.new("RGB", (56, 56))
        # Decoding is where one request's memory grows with its pixels (a 7.8 KB PNG can unpack to
        # 0.2 GB): at most tools.max_concurrent_decodes at once, whatever max_ongoing_requests is.
        self._decodes = asyncio.Semaphore(max(1, tools.max_concurrent_decodes))
        self._decoding = self.decodes_peak = 0  # decodes running now, and the most seen at once

    # ---- in-cluster -----------------------------------------------------------------------

    async def call(self, name: str, image: Any, arguments: Any,
                   frame_size: tuple[int, int] | None = None) -> ToolResult:
        """Run tool `name` on `image` with the model's `arguments`; never raises.

        Args:
            name: registry name of the tool (`image_zoom_in_tool`, ...).
            image: `image_arg(ref)` (preferred: resolved here, cached per replica), a bare ObjectRef
                (resolved by Ray before the call), a PIL image, or encoded image bytes.
            arguments: the arguments of the model's tool call (dict or JSON string; anything).
            frame_size: (w, h) of the model's frame when `image` is the original at another
                resolution (the box is mapped to it before cropping); None = `image` is the frame.

        Returns:
            ToolResult with the PIL image at native size, or ok=False and the error text.
        """
        self.calls += 1
        # No timeout here: the caller's is the one per call (the agent loop bounds the whole
        # exchange, queueing included, by tools.timeout_s and cancels this request when it fires).
        try:
            result = await self._run(name, image, arguments, frame_size)
        except Exception as e:  # the invariant: nothing escapes
            result = ToolResult(False, f"Error processing {name}: {type(e).__name__}: {e}"[:1000])
        if not result.ok:
            self.errors += 1
        return result

    async def _image(self, image: Any) -> Image.Image | ToolResult:
        """The PIL image from any accepted form, or an error result."""
        if isinstance(image, (list, tuple)) and len(image) == 1 and isinstance(image[0], ray.ObjectRef):
            image = image[0]
        if isinstance(image, ray.ObjectRef):
            key = image.hex()
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            try:
                value = await image
            except Exception as e:
                return ToolResult(False, f"Error: the image reference could not be fetched "
                                         f"({type(e).__name__}); the episode's image is gone.")
            resolved = await self._image(value)
            if isinstance(resolved, Image.Image):
                self._cache.put(key, resolved)
            return resolved
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, (bytes, bytearray, memoryview)):
            try:
                async with self._decoding_slot():
                    return await asyncio.to_thread(decode_image, bytes(image), max_pixels=self.cfg.max_image_pixels,
                                                   max_bytes=self.cfg.max_request_bytes)
            except ImageDecodeError as e:
                return ToolResult(False, f"Error: {e}")
        return ToolResult(False, f"Error: image must be image_arg(ObjectRef), a PIL image or encoded "
                                 f"bytes, got {type(image).__name__}.")

    async def _run(self, name: str, image: Any, arguments: Any,
                   frame_size: tuple[int, int] | None = None) -> ToolResult:
        pil = await self._image(image)
        if isinstance(pil, ToolResult):
            return pil
        return await asyncio.to_thread(self._execute, name, pil, arguments, frame_size)

    def _execute(self, name: Any, image: Image.Image, arguments: Any,
                 frame_size: tuple[int, int] | None = None) -> ToolResult:
        options: dict[str, Any] = {"min_side_policy": self.cfg.min_side_policy, "box_scale": self.box_scale}
        if frame_size is not None:
            options["frame_size"] = frame_size
        tool = self._tools.get(name) if isinstance(name, str) else None
        return run_call(tool, name, CallContext(image=image, options=options), arguments, sorted(self._tools))

    async def stats(self) -> dict[str, Any]:
        """Counters of this replica (tests check that no request restarted it)."""
        ctx = serve.get_replica_context()
        return {"pid": os.getpid(), "replica": ctx.replica_id.unique_id, "calls": self.calls,
                "errors": self.errors, "timeouts": self.timeouts, "cache_hits": self._cache.hits,
                "decodes_peak": self.decodes_peak}

    def check_health(self) -> None:
        """Serve's periodic probe: one crop of a small image must succeed."""
        if not self._execute("image_zoom_in_tool", self._probe, {"bbox_2d": [0, 0, 28, 28]}).ok:
            raise RuntimeError("tool self-test failed: image_zoom_in_tool cannot crop a 56x56 image")

    # ---- HTTP -----------------------------------------------------------------------------

    def _denied(self, request: Request) -> JSONResponse | None:
        if authorized(request.headers.get("authorization"), self._token):
            return None
        return _json(401, False, "Error: missing or wrong bearer token (Authorization: Bearer ...)")

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/")
    async def schemas(self, request: Request) -> Any:
        return self._denied(request) or [self._tools[n].schema for n in sorted(self._tools)]

    @app.post("/{name}")
    async def http_call(self, name: str, request: Request) -> JSONResponse:
        """`POST /tools/{name}`: see the module docstring for the body and the status codes."""
        denied = self._denied(request)
        if denied:
            return denied
        if name not in self._tools:
            return _json(404, False, f"Error: unknown tool {name[:100]!r}; available tools: "
                                     f"{', '.join(sorted(self._tools))} (plugin tools such as python and "
                                     f"search are in-cluster only).")
        body = await read_body_capped(request, self.cfg.max_request_bytes)
        if body is None:
            return _json(413, False, f"Error: request body over {self.cfg.max_request_bytes} bytes "
                                     f"(tools.max_request_bytes): send a smaller image")
        try:
            req = ToolRequest.model_validate_json(body)
        except ValidationError as e:
            return _json(400, False, 'Error: the body must be JSON {"image": base64, "arguments": {...}}'
                                     f" ({e.error_count()} problem(s): {e.errors()[0]['msg']})")
        self.calls += 1
        if req.resize is not None:
            # the first resize imports torch and transformers (5-8 s here, more on a busy node):
            # the replica's own start-up cost, not the tool call's, so it is outside the timeout
            await asyncio.to_thread(resizer)
        try:
            result = await asyncio.wait_for(self._http_decoded_work(name, req), self.cfg.timeout_s)
        except asyncio.TimeoutError:
            self.timeouts += 1
            return _json(504, False, f"Error: the tool call timed out after {self.cfg.timeout_s:g} s")
        except ImageTooLargeError as e:
            return _json(413, False, f"Error: {e}")
        except (ImageDecodeError, ValueError) as e:
            return _json(400, False, f"Error: {e}"[:1000])
        except Exception as e:  # e.g. the optional resize failing: answered, never fatal
            return _json(500, False, f"Error processing {name}: {type(e).__name__}: {e}"[:1000])
        if not result.ok:
            self.errors += 1
        image = base64.b64encode(encode_png(result.image)).decode() if result.image is not None else None
        return _json(200, result.ok, result.text, image)

    async def _http_decoded_work(self, name: str, req: ToolRequest) -> ToolResult:
        async with self._decoding_slot():  # the wait counts against the call's timeout
            try:
                return await asyncio.to_thread(self._http_work, name, req)
            finally:
                await asyncio.to_thread(trim_freed_memory)  # the decoded frame is garbage now

    @contextlib.asynccontextmanager
    async def _decoding_slot(self) -> AsyncIterator[None]:
        """One of tools.max_concurrent_decodes slots (waits for one); counts the high-water mark."""
        async with self._decodes:
            self._decoding += 1
            self.decodes_peak = max(self.decodes_peak, self._decoding)
            try:
                yield
            finally:
                self._decoding -= 1

    def _http_work(self, name: str, req: ToolRequest) -> ToolResult:
        """Decode (size-checked), optionally smart-resize, run the tool. Runs in a worker thread."""
        image = decode_base64_image(req.image, max_pixels=self.cfg.max_image_pixels,
                                    max_bytes=self.cfg.max_request_bytes)
        if req.resize is not None:
            lo, hi = req.resize.min_pixels, req.resize.max_pixels
            if not 0 < lo <= hi <= self.cfg.max_image_pixels:
                raise ValueError(f"resize needs 0 < min_pixels <= max_pixels <= "
                                 f"{self.cfg.max_image_pixels}, got {lo}, {hi}")
            image = resizer()(image, lo, hi, req.resize.factor)
        return self._execute(name, image, req.arguments)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder (`serve deploy deploy/serve.yaml` or the driver).

    Args:
        args: `{"config": scenario YAML path, "overrides": [key=value, ...]}`; replicas and
            resources come from `serve.tools`, tool behaviour from `tools`. The bearer token is
            read here from the env var named by `serve.auth_token_env` (set it where the app is
            built: the driver, or the application's runtime_env for `serve deploy`).
    """
    cfg = config_from_args(args)
    token = bearer_token(cfg.serve.auth_token_env)
    tools = cfg.tools
    if tools.box_scale == "auto":  # the policy family's own scale (deepeyes/family.py)
        from deepeyes.policy_family import model_family  # imports torch: only a builder with box_scale=auto needs it

        tools = dataclasses.replace(tools, box_scale=model_family(cfg.model).box_scale)
    return bind_tools(tools, token, deployment_options(cfg.serve.tools, cfg.serve.access_log), cfg.serve.access_log)


def bind_tools(tools: ToolsConfig, token: str | None, options: dict[str, Any], access_log: bool) -> serve.Application:
    """The tools app: ToolService (the image tools, HTTP) and one ToolHost per other deployment name
    among the enabled tools, sized by the entries' deployment_options."""
    groups: dict[str, list[ToolSpec]] = {}
    for spec in specs_for(tools):
        groups.setdefault(spec.deployment, []).append(spec)
    hosts = []
    for name, specs in groups.items():
        if name == "ToolService":
            continue
        merged: dict[str, Any] = {}
        for spec in specs:
            merged.update(spec.deployment_options)
        try:
            dc = DeploymentConfig(**merged)
        except TypeError as e:
            raise ConfigError(f"deployment_options of {[s.name for s in specs]} ({name}): {e}; the keys are "
                              f"those of serve.tools (num_replicas, max_replicas, num_cpus, ...)") from None
        opts = deployment_options(dc, access_log)
        hosts.append(ToolHost.options(name=name, **opts).bind(specs))
    return ToolService.options(**options).bind(tools, token, image_specs(tools), *hosts)

