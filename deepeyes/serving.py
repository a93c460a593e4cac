"""What every Serve application shares: config from builder args, deployment options, bearer auth.

Each service folder has `app.py` with `build_app(args: dict) -> serve.Application`, an application
builder in Serve's sense: `serve deploy deploy/serve.yaml` calls it with the YAML's `args`, the
driver calls it with `{"config": path, "overrides": [...]}`. Both reach the same Config tree.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from deepeyes.config import Config, ConfigError, DeploymentConfig, load_config

if TYPE_CHECKING:
    from starlette.requests import Request

ModelT = TypeVar("ModelT")

# The one home of the Serve names: application, route prefix and deployment class of each service.
APP_NAMES = {"tools": "tools", "judge": "judge", "rollout": "rollout"}
ROUTE_PREFIXES = {"tools": "/tools", "judge": "/judge", "rollout": "/rollout"}
DEPLOYMENT_NAMES = {"tools": "ToolService", "judge": "JudgeService", "rollout": "RolloutWorker"}


def config_from_args(args: dict[str, Any] | None) -> Config:
    """Builder args -> Config. Keys: `config` (scenario YAML path), `overrides` (list of key=value)."""
    args = dict(args or {})
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ConfigError(f"unknown application args {sorted(unknown)}: use 'config' (a scenario "
                          f"YAML path) and 'overrides' (a list of key=value)")
    overrides = args.get("overrides") or []
    if isinstance(overrides, dict):  # YAML mapping form: {rollout.n: 4}
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(args.get("config"), list(overrides))


def deployment_options(dc: DeploymentConfig, access_log: bool = False) -> dict[str, Any]:
    """DeploymentConfig -> keyword arguments of `Deployment.options(...)`."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": dc.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": dc.num_cpus, "num_gpus": dc.num_gpus},
        "logging_config": {"enable_access_log": access_log},
    }
    if dc.max_replicas > 0:
        opts["autoscaling_config"] = {
            "min_replicas": dc.min_replicas,
            "max_replicas": dc.max_replicas,
            "target_ongoing_requests": max(1, dc.max_ongoing_requests // 2),
        }
    else:
        opts["num_replicas"] = dc.num_replicas
    return opts


def bearer_token(env_name: str) -> str | None:
    """The configured bearer token (None = the HTTP routes are open to the bound network)."""
    token = os.environ.get(env_name, "")
    return token or None


def authorized(header_value: str | None, token: str | None) -> bool:
    """Constant-time check of an `Authorization: Bearer ...` header against the token."""
    if token is None:
        return True
    if not header_value or not header_value.startswith("Bearer "):
        return False
    return hmac.compare_digest(header_value[len("Bearer "):].encode(), token.encode())


def actor_threads(configured: int = 0) -> int:
    """torch intra-op threads for this process: `configured` if > 0, else the CPUs Ray reserved
    for this actor (at least 1; fractional CPUs round down), else the cores this process may use.

    One thread per reserved CPU keeps actors that run at the same time from oversubscribing the
    cores; a scenario that runs phases one after another (the synchronous GRPO step) reserves
    each phase's actors the machine's cores."""
    if configured > 0:
        return configured
    try:
        import ray  # Ray: only on a cluster

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    except Exception:  # not in a Ray worker
        pass
    return max(1, len(os.sched_getaffinity(0)))


def gauge_refresh_s() -> float:
    """Half of Ray's metrics report interval (10 s by default; a cluster may set it lower)."""
    try:
        import ray  # Ray: only on a cluster

        return max(0.2, ray._config.metrics_report_interval_ms() / 2000)  # _raylet's config object
    except Exception:  # not inside Ray: the default interval's half
        return 5.0


def keep_gauge_fresh(set_now: Callable[[], None], every_s: float | None = None) -> threading.Thread:
    """Call `set_now` (which sets one or more Ray gauges) now and every `every_s` seconds (default:
    half of Ray's report interval), in a daemon thread, for the life of the process.

    Ray's OpenTelemetry path exports a gauge's value in the report window after each `set()` and
    then forgets it (its agent keeps a series for two windows): a gauge set only on rare events,
    such as a weight sync, is absent from the metrics endpoint most of the time.
    """
    period = every_s or gauge_refresh_s()

    def loop() -> None:
        while True:
            try:
                set_now()
            except Exception:  # metrics must never take a replica down
                pass
            time.sleep(period)

    thread = threading.Thread(target=loop, name="gauge-refresh", daemon=True)
    thread.start()
    return thread


async def read_body_capped(request: "Request", cap: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed `cap` bytes: a declared
    Content-Length over the cap is refused before a byte is read, a chunked body once the bytes
    read so far pass it. Call it after the token check, never before."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_body(request: "Request", model: type[ModelT], cap: int, cap_key: str) -> ModelT:
    """The capped body parsed into `model` (a pydantic model): 413 over `cap` (naming `cap_key`),
    a 422 naming each bad field for bad JSON, too-deep nesting or invalid fields. Check the
    bearer token before calling it."""
    from fastapi import HTTPException  # fastapi: only the HTTP error path
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    raw = await read_body_capped(request, cap)
    if raw is None:
        raise HTTPException(413, f"request body over {cap} bytes ({cap_key})")
    try:
        return model.model_validate(json.loads(raw))
    except (ValueError, RecursionError) as e:
        errors = e.errors() if isinstance(e, ValidationError) else [
            {"loc": ["body"], "msg": f"invalid JSON: {e}"[:300], "type": "json_invalid"}]
        raise RequestValidationError(errors) from None
