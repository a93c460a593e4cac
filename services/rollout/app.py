"""Serve adapter of the rollout service: replicas that run episodes on a versioned policy.

`build_app({"config": path, "overrides": [...]})` -> the "rollout" application (route /rollout).
The driver calls `RolloutWorker.run_episode(EpisodeRequest)` through a deployment handle and gets
a Trajectory; the HTTP routes are for debugging and meant for trusted networks only (bearer token
optional, `serve.auth_token_env`).
"""

# No `from __future__ import annotations` here: Serve pickles the ingress class by value, and
# FastAPI must see the route's real annotation types, not strings it can no longer resolve.
import asyncio
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import ray
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from deepeyes.config import Config
from deepeyes.contracts import RewardResult, ScoreRequest, ToolResult, image_arg
from deepeyes.toolspec import ToolSpec, specs_for
from deepeyes.images import ImageDecodeError, ImageTooLargeError, decode_base64_image, trim_freed_memory
from deepeyes.policy import resolve_policy_path
from deepeyes.serving import (APP_NAMES, DEPLOYMENT_NAMES, authorized, bearer_token, config_from_args,
                              actor_threads, deployment_options, keep_gauge_fresh, read_json_body)
from services.rollout.agent_loop import ReleaseFn, ScoreFn, ToolFn, run_episode
from services.rollout.engines import Engine, check_sampling
from services.rollout.hf_engine import load_hf_engine
from services.rollout.trajectory import Trajectory
from services.rollout.types import EPISODE_SEED_LIMIT, EpisodeRequest, PolicyIO
from services.rollout.weights import fetch_weights, get_weight_store, unpack_state

WEIGHT_FETCH_TIMEOUT_S = 300.0   # fetching a published state dict from the object store
JUDGE_PROBE_EVERY_S = 10.0       # how often a replica looks again for a judge app that is absent


class VersionNotPublished(RuntimeError):
    """An episode asked for a policy version newer than the latest published (HTTP answers 409)."""


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image"]  # the i-th image part is images_b64[i]


class ChatMessage(BaseModel):
    """A chat message the template can render: anything else is a 422, not a 500 inside it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class EpisodeBody(BaseModel):
    """POST /rollout/episode: one episode; images are base64-encoded files (PNG/JPEG)."""

    messages: list[ChatMessage]
    images_b64: list[str] = Field(default_factory=list)
    ground_truth: str = ""
    question: str = ""
    data_source: str = ""
    uid: str = "http"
    group_id: str = "http"
    min_version: int = Field(0, ge=0)
    temperature: float | None = Field(None, description="0 (greedy) or in [0.01, 10]; None = the config's")
    greedy: bool = False
    seed: int | None = Field(None, ge=0, lt=EPISODE_SEED_LIMIT)

    @field_validator("temperature")
    @classmethod
    def _sane_temperature(cls, v: float | None) -> float | None:  # NaN, 1e-320, 1e9 -> 422
        if v is not None:
            check_sampling(v, None)
        return v


class EpisodeSummary(BaseModel):
    """What the debug route returns: the trajectory without tensors or images."""

    uid: str
    response_text: str
    num_turns: int
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    reward: dict[str, Any] | None  # RewardResult.to_dict(); None = not scored
    policy_version: int
    prompt_tokens: int
    response_tokens: int
    timings: dict[str, float]


def policy_folder(cfg: Config) -> Path:
    """The one place that decides which folder the rollout policy loads from."""
    return resolve_policy_path(cfg.model)


def build_engine(cfg: Config, device: str) -> tuple[Engine, PolicyIO]:
    """(engine, PolicyIO) for cfg.rollout.engine on the policy folder."""
    folder = policy_folder(cfg)
    if cfg.rollout.engine == "vllm":
        from services.rollout.vllm_engine import VLLMEngine  # vLLM is heavy: only where it runs

        return (VLLMEngine(folder, cfg.model, cfg.rollout),
                PolicyIO.from_folder(folder, cfg.model.min_pixels, cfg.model.max_pixels))
    engine = load_hf_engine(folder, cfg.model, cfg.rollout, device=device)
    return engine, PolicyIO.from_policy(engine.policy)


def summarize(t: Trajectory) -> EpisodeSummary:
    return EpisodeSummary(
        uid=t.uid, response_text=t.response_text, num_turns=t.num_turns,
        tool_calls=[{"turn": c.turn, "name": c.name, "arguments": c.arguments, "ok": c.ok,
                     "text": c.text, "executed": c.executed, "appended": c.appended} for c in t.tool_calls],
        finish_reason=t.finish_reason, reward=t.reward.to_dict() if t.reward is not None else None,
        policy_version=t.policy_version,
        prompt_tokens=len(t.prompt_ids), response_tokens=sum(t.loss_mask), timings=t.timings)


def serve_tool_fn(tools_handle: DeploymentHandle, plugin_handles: dict[str, DeploymentHandle] | None = None,
                  specs: list[ToolSpec] | None = None) -> ToolFn:
    """Per-episode tool callable over the tools app's handles.

    Image tools go to ToolService; a plugin tool goes to the deployment its registry entry names,
    with the trajectory's instance id as Serve's multiplexed model id (its calls stay on the replica
    that holds its instance). The model-frame image goes into the object store ONCE per episode (the
    loop passes the same image object to every call) and travels as `image_arg(ref)`, which the
    handle passes through unresolved (services/tools/app.py). No timeout here: the agent loop bounds
    each call with tools.timeout_s (services/rollout/agent_loop.py `_call_one`), the one layer that does.
    """
    cache: dict[int, ray.ObjectRef] = {}
    where = {s.name: s.deployment for s in specs or []}

    async def call_tool(name: str, image: Any, arguments: dict[str, Any], **options: Any) -> ToolResult:
        # image: the model-frame PIL image, or (EpisodeRequest.crop_source) the original as a PIL
        # image or encoded bytes; options: frame_size when it is the original, instance_id/row_id/fresh
        # for a plugin tool
        if image is not None and id(image) not in cache:
            cache[id(image)] = ray.put(image)
        ref = image_arg(cache[id(image)]) if image is not None else None
        host = (plugin_handles or {}).get(where.get(name, ""))
        if host is None:
            return await tools_handle.call.remote(name, ref, arguments, **options)
        iid = options.get("instance_id", "")
        return await (host.options(multiplexed_model_id=iid) if iid else host).call.remote(name, ref, arguments, **options)

    return call_tool


def serve_release_fn(plugin_handles: dict[str, DeploymentHandle], specs: list[ToolSpec]) -> ReleaseFn:
    """(name, instance_id) -> the release call to the replica that holds the instance."""
    where = {s.name: s.deployment for s in specs}

    async def release(name: str, instance_id: str) -> None:
        host = plugin_handles.get(where.get(name, ""))
        if host is not None:
            await host.options(multiplexed_model_id=instance_id).release.remote(name, instance_id)

    return release


class _Metrics:
    """Ray metrics of the replica (the names of docs/design.md, "Metric names", with '/' -> '_' for Prometheus)."""

    def __init__(self, replica: str) -> None:
        self.tags = {"app": "rollout", "replica": replica}
        keys = ("app", "replica")
        self.hist = {name: metrics.Histogram(name.replace("/", "_"), description=name, tag_keys=keys,
                                             boundaries=bounds)
                     for name, bounds in [("rollout/num_turns", [2, 4, 6, 8, 10, 12]),
                                          ("rollout/tool_calls", [0.5, 1, 2, 3, 4, 5]),
                                          ("rollout/response_tokens", [64, 256, 1024, 4096, 16384]),
                                          ("timing/generate_s", [0.1, 0.5, 1, 5, 20, 60]),
                                          ("timing/tool_s", [0.01, 0.1, 0.5, 1, 5]),
                                          ("timing/judge_s", [0.01, 0.1, 1, 5, 30]),
                                          ("timing/episode_s", [0.5, 1, 5, 20, 60, 300])]}
        self.tool_errors = metrics.Counter("rollout_tool_errors", description="rollout/tool_errors", tag_keys=keys)
        self.episodes = metrics.Counter("rollout_episodes", description="episodes served", tag_keys=keys)
        self.version = metrics.Gauge("sync_version", description="sync/version", tag_keys=keys)
        self.idle = metrics.Gauge("rollout_idle_share", tag_keys=keys,
                                  description="timing/rollout_idle_share: share of the last few seconds "
                                              "this replica's engine had nothing to generate")
        self.sync_s = metrics.Histogram("sync_seconds", description="sync/seconds", tag_keys=keys,
                                        boundaries=[0.01, 0.1, 1, 10, 60])
        self.batch_size = metrics.Histogram("rollout_engine_batch_size", tag_keys=keys,
                                            description="sequences per batched engine forward",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64])
        for m in [*self.hist.values(), self.tool_errors, self.episodes, self.version, self.sync_s,
                  self.batch_size, self.idle]:
            m.set_default_tags(self.tags)

    def record(self, t: Trajectory) -> None:
        values = {"rollout/num_turns": t.num_turns,
                  "rollout/tool_calls": sum(1 for c in t.tool_calls if c.executed),
                  "rollout/response_tokens": len(t.response_ids),
                  "timing/generate_s": t.timings.get("generate_s", 0.0),
                  "timing/tool_s": t.timings.get("tool_s", 0.0),
                  "timing/judge_s": t.timings.get("judge_s", 0.0),
                  "timing/episode_s": t.timings.get("total_s", 0.0)}
        for name, v in values.items():
            self.hist[name].observe(float(v))
        errors = sum(1 for c in t.tool_calls if c.executed and not c.ok)
        if errors:
            self.tool_errors.inc(errors)
        self.episodes.inc()

    def sync(self, version: int, seconds: float) -> None:
        self.version.set(version)
        self.sync_s.observe(seconds)


def _replica_tag() -> str:
    try:
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return str(getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", "local"))
    except Exception:  # outside a replica (tests calling the class directly)
        return "local"


http = FastAPI(title="deepeyes rollout (debug routes; trusted networks only)")


@http.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, without FastAPI's echo of the input: a NaN there is not JSON
    (the default handler then fails with a 500) and the echo hands a caller its own body back."""
    return JSONResponse(status_code=422, content={"detail": [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]})


@serve.deployment
@serve.ingress(http)
class RolloutWorker:
    """A replica runs many episodes at once on one engine holding one policy version.

    Invariant: an episode that asks for min_version v runs on a policy of version >= v, and each
    replica loads each version at most once (concurrent requests wait on the same load); a new or
    restarted replica starts on the latest published version. Publishing never talks to replicas:
    they pull from the WeightStore (services/rollout/weights.py).
    """

    def __init__(self, cfg: Config) -> None:
        torch.set_num_threads(actor_threads(cfg.rollout.torch_threads))
        self.cfg = cfg
        device = "cuda" if cfg.serve.rollout.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.engine, self.policy_io = build_engine(cfg, device)
        self._load_lock = asyncio.Lock()
        self._gate = asyncio.Condition()  # episodes in flight vs weight loads (run_episode)
        self._running = 0
        self._loading = False
        self._token = bearer_token(cfg.serve.auth_token_env)
        self._tools = serve.get_deployment_handle(DEPLOYMENT_NAMES["tools"], app_name=APP_NAMES["tools"])
        self._specs = specs_for(cfg.tools)  # the registry entries of the enabled tools
        self._plugins = {d: serve.get_deployment_handle(d, app_name=APP_NAMES["tools"])
                         for d in {s.deployment for s in self._specs} - {DEPLOYMENT_NAMES["tools"]}}
        self._judge: DeploymentHandle | None = None
        self._judge_probe_t = 0.0
        self.episodes = 0
        self.loads: list[int] = []
        self._decodes = asyncio.Semaphore(1)  # HTTP images decoded one request at a time
        # Start on the latest published version, if any: an HF engine loads it here; an engine
        # without a synchronous load (vLLM) loads it before its first episode.
        self._start_version = 0
        store = get_weight_store()
        if store is not None:
            version, refs = ray.get(store.latest.remote(), timeout=WEIGHT_FETCH_TIMEOUT_S)
            self._start_version = version
            if version > self.engine.version and refs and hasattr(self.engine, "load_state_sync"):
                self.engine.load_state_sync(fetch_weights(refs[0], WEIGHT_FETCH_TIMEOUT_S), version)
                self.loads.append(version)
        self._metrics = _Metrics(_replica_tag())
        # Ray exports a gauge only in the report window after a set(): set it again every few
        # seconds so sync_version stays on the metrics endpoint between weight syncs.
        busy = [time.monotonic(), self.engine.busy_s]

        def refresh() -> None:
            self._metrics.version.set(self.engine.version)
            now, b = time.monotonic(), self.engine.busy_s
            if now > busy[0]:  # the engine's idle share since the last refresh (a decode counts when it ends)
                self._metrics.idle.set(min(1.0, max(0.0, 1.0 - (b - busy[1]) / (now - busy[0]))))
            busy[:] = [now, b]

        keep_gauge_fresh(refresh)
        # the HF engine reports each batched forward's size (vLLM batches inside, unseen)
        self.engine.on_batch = lambda n: self._metrics.batch_size.observe(float(n))

    # -- the handle API -----------------------------------------------------------------------

    async def run_episode(self, request: EpisodeRequest) -> Trajectory:
        """Run one episode on a policy of version >= request.min_version.

        Unless rollout.partial, an episode runs every turn on the version it started with: a load
        that a newer request needs waits for the episodes in flight to end, and no episode starts
        while a load waits or runs. With rollout.partial the load goes ahead between turns, and
        `extra["turn_versions"]` records the version of each assistant turn.
        """
        need = max(request.min_version, self._start_version)
        async with self._gate:
            await self._gate.wait_for(lambda: not self._loading)
            if self.engine.version < need:
                self._loading = True
                try:
                    if not self.cfg.rollout.partial:
                        await self._gate.wait_for(lambda: self._running == 0)
                    await self._ensure_version(need)
                finally:
                    self._loading = False
                    self._gate.notify_all()
            self._running += 1
        turn_versions: list[int] = []

        async def generate(ids: list[int], images: list[Any], sp: Any) -> Any:
            turn_versions.append(self.engine.version)
            return await self.engine.generate(ids, images, sp)

        try:
            traj = await self._agent_loop(request, generate, self.engine.version)
        finally:
            async with self._gate:
                self._running -= 1
                self._gate.notify_all()
        traj.extra["turn_versions"] = turn_versions
        # the engine's busy-seconds counter as this episode ends: the trainer's rollout idle share
        traj.extra["engine_stamp"] = (self._metrics.tags["replica"], time.time(), float(self.engine.busy_s))
        if turn_versions:  # the oldest policy that sampled any of it is the one its staleness counts
            traj.policy_version = min(turn_versions)
        self.episodes += 1
        self._metrics.record(traj)
        return traj

    async def stats(self) -> dict[str, Any]:
        """Version, episodes served, versions loaded, batch sizes the engine saw, tokens generated."""
        return {"version": self.engine.version, "episodes": self.episodes, "loads": list(self.loads),
                "batch_sizes": dict(self.engine.batch_sizes), "tokens_generated": self.engine.tokens_generated,
                "joined": self.engine.joined, "prefill_shared": self.engine.prefill_shared,
                "decode_thread_cpu_s": self.engine.decode_thread_cpu_s,
                "engine_busy_s": self.engine.busy_s, "replica": _replica_tag(),
                "pid": os.getpid(), "torch_threads": torch.get_num_threads()}

    async def check_health(self) -> None:
        """Raises (Serve then restarts the replica) once the engine can no longer generate."""
        await self.engine.check_health()

    # -- HTTP (debug) -------------------------------------------------------------------------

    @http.post("/episode", response_model=EpisodeSummary, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": EpisodeBody.model_json_schema()}}}})
    async def http_episode(self, request: Request) -> EpisodeSummary:
        # The token first, then the body (capped), then the images (capped before decoding): a
        # caller without the token costs a header compare, FastAPI's typed body would be parsed
        # before any of this ran.
        if not authorized(request.headers.get("authorization"), self._token):
            raise HTTPException(401, "missing or wrong bearer token (see serve.auth_token_env)")
        body = await read_json_body(request, EpisodeBody, self.cfg.serve.max_request_bytes,
                                    "serve.max_request_bytes")
        try:
            return await self._http_run(body)  # its decoded images are garbage once it returns
        finally:
            await asyncio.to_thread(trim_freed_memory)

    async def _http_run(self, body: EpisodeBody) -> EpisodeSummary:
        try:
            async with self._decodes:
                images = await asyncio.to_thread(self._decode_images, body.images_b64)
        except ImageTooLargeError as e:
            raise HTTPException(413, f"images_b64: {e}") from None
        except ImageDecodeError as e:
            raise HTTPException(400, f"images_b64 must hold base64-encoded image files ({e})") from None
        try:
            req = EpisodeRequest(images=images, **body.model_dump(exclude={"images_b64"}))
            return summarize(await self.run_episode(req))
        except VersionNotPublished as e:
            raise HTTPException(409, str(e)) from e
        except ValueError as e:
            raise HTTPException(400, str(e)) from e

    def _decode_images(self, encoded: list[str]) -> list[Image.Image]:
        """base64 image files -> RGB images, each size-checked from its header before decoding."""
        return [decode_base64_image(b, max_pixels=self.cfg.serve.max_image_pixels,
                                    max_bytes=self.cfg.serve.max_request_bytes,
                                    cap_key="serve.max_image_pixels") for b in encoded]

    @http.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"ok": True, "version": self.engine.version}

    # -- internals ----------------------------------------------------------------------------

    async def _agent_loop(self, request: EpisodeRequest, generate: Any, version: int) -> Trajectory:
        return await run_episode(request, policy_io=self.policy_io, generate=generate, call_tool=self._tool_fn(),
                                 score=await self._score_fn(), cfg=self.cfg.rollout, tools_cfg=self.cfg.tools,
                                 policy_version=version, specs=self._specs,
                                 release_tool=serve_release_fn(self._plugins, self._specs))

    async def _ensure_version(self, min_version: int) -> None:
        if self.engine.version >= min_version:
            return
        async with self._load_lock:  # one load per version: latecomers find it done
            if self.engine.version >= min_version:
                return
            store = get_weight_store()
            if store is None:
                raise VersionNotPublished(
                    f"episode needs policy version {min_version} but no weights were published (this "
                    f"replica serves version {self.engine.version}; publish_weights() creates the WeightStore)")
            version, refs = await asyncio.wait_for(store.latest.remote(), WEIGHT_FETCH_TIMEOUT_S)
            if version < min_version:
                raise VersionNotPublished(f"episode needs policy version {min_version}; the latest "
                                          f"published is {version}: publish before requesting it")
            t0 = time.perf_counter()
            state = unpack_state(await asyncio.wait_for(refs[0], WEIGHT_FETCH_TIMEOUT_S))  # zero-copy views
            await self.engine.load_weights(state, version)
            self.loads.append(version)
            self._metrics.sync(version, time.perf_counter() - t0)

    def _tool_fn(self) -> ToolFn:
        return serve_tool_fn(self._tools, self._plugins, self._specs)

    async def _score_fn(self) -> ScoreFn | None:
        mode = self.cfg.rollout.reward
        if mode == "never":
            return None
        if self._judge is None and (mode == "always" or time.monotonic() - self._judge_probe_t > JUDGE_PROBE_EVERY_S):
            self._judge_probe_t = time.monotonic()
            if mode == "always" or APP_NAMES["judge"] in serve.status().applications:
                self._judge = serve.get_deployment_handle(DEPLOYMENT_NAMES["judge"], app_name=APP_NAMES["judge"])
        if self._judge is None:
            return None
        judge = self._judge
        # The judge retries internally; this bounds the whole exchange.
        timeout = self.cfg.judge.timeout_s * (self.cfg.judge.max_retries + 1) + 5.0

        async def score(request: ScoreRequest) -> RewardResult:
            return await asyncio.wait_for(judge.score.remote(request), timeout)

        return score


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The rollout application from builder args ({"config": path, "overrides": [...]})."""
    cfg = config_from_args(args)
    return RolloutWorker.options(**deployment_options(cfg.serve.rollout, cfg.serve.access_log)).bind(cfg)
