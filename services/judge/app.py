"""The judge as a Ray Serve application: `score` for in-cluster callers, an OpenAI-compatible route.

- `JudgeService.score(ScoreRequest) -> RewardResult` (through a handle): the rollout calls it at
  episode end, so judging overlaps with other episodes' generation.
- `POST /judge/score`: the same over HTTP for callers outside the cluster.
- `POST /judge/v1/chat/completions`, `GET /judge/v1/models`: an OpenAI-compatible front of the
  `hf` backend's model, so the official `openai` client (and this project's `openai` backend)
  works against `base_url=http://127.0.0.1:{port}/judge/v1`.

The HTTP routes are for trusted networks: Serve binds 127.0.0.1 unless configured; a bearer token
is checked when `serve.auth_token_env` names a set environment variable.

Deploy: `serve.run(build_app({"config": path, "overrides": [...]}), name="judge",
route_prefix="/judge")` or `serve deploy deploy/serve.yaml`.
"""


import asyncio
import concurrent.futures
import os
import time
import uuid
from typing import Any, Coroutine, TypeVar

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.util import metrics

from deepeyes.config import Config
from deepeyes.serving import (authorized, bearer_token, config_from_args, deployment_options, keep_gauge_fresh,
                              read_json_body)
from services.judge.backends import check_reachable
from services.judge.factory import make_judge
from services.judge.hf import HFGenerator, HFJudge
from services.judge.reward import RewardResult, ScoreRequest
from services.judge.scoring import (JudgeFailure, VerdictCache, apply_failure_policy, score as score_episode,
                                    stats as judge_stats)

__all__ = ["JudgeService", "build_app", "check_reachable"]

MAX_CHAT_TOKENS = 512  # cap of the chat route: the judge replies with a word, not an essay
# Request caps: far above a real episode (a response of many turns, a long question), far below
# what would make one request cost seconds of CPU.
MAX_RESPONSE_CHARS, MAX_TEXT_CHARS, MAX_COUNT = 1_000_000, 100_000, 1_000_000


class OpenAIError(HTTPException):
    """An error of the OpenAI-compatible routes, in OpenAI's body shape so that the official
    client's exception carries the message and the parameter at fault."""

    def __init__(self, status_code: int, message: str, param: str | None = None) -> None:
        super().__init__(status_code, message)
        self.param = param


class ContentPart(BaseModel):
    type: str = Field(max_length=32)
    text: str | None = Field(default=None, max_length=2 * MAX_TEXT_CHARS)


class ChatMessage(BaseModel):
    role: str = Field(max_length=32)
    content: str | list[ContentPart] = Field(max_length=2 * MAX_TEXT_CHARS)

    def text(self) -> str:
        """The content as one string: text parts joined by newlines (what vLLM does)."""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise OpenAIError(400, f"content part of type {part.type!r}: the judge's chat route "
                                       f"takes text parts only", param="messages")
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(BaseModel):
    """The OpenAI fields the route honours; `stream`, `n` > 1, `stop` and every other parameter
    given a value (top_p, logprobs, seed, tools, ...) are refused by name: a client would
    otherwise get a silently different answer."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(default="", max_length=512)
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_CHAT_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_CHAT_TOKENS)
    stream: bool = False
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None

    def refuse_unsupported(self) -> None:
        """Raise OpenAIError(400) naming the first parameter this route does not implement."""
        if self.stream:
            raise OpenAIError(400, "stream=true is not supported by the judge's chat route "
                                   "(it answers one JSON body)", param="stream")
        if self.n > 1:
            raise OpenAIError(400, f"n={self.n} is not supported by the judge's chat route "
                                   f"(one choice per request)", param="n")
        if self.stop:
            raise OpenAIError(400, "stop is not supported by the judge's chat route", param="stop")
        for name, value in (self.model_extra or {}).items():
            if value is not None:  # clients send null for "not set"
                raise OpenAIError(400, f"{name[:64]} is not supported by the judge's chat route (it "
                                       f"honours model, messages, temperature, max_tokens and "
                                       f"max_completion_tokens)", param=name[:64])


class ScoreBody(BaseModel):
    response_text: str = Field(max_length=MAX_RESPONSE_CHARS)
    question: str = Field(max_length=MAX_TEXT_CHARS)
    ground_truth: str = Field(max_length=MAX_TEXT_CHARS)
    data_source: str = Field(default="", max_length=256)
    tool_calls: int = Field(default=0, ge=0, le=MAX_COUNT)
    crops: int = Field(default=0, ge=0, le=MAX_COUNT)


class _Metrics:
    """Ray metrics of the judge. Prometheus names cannot hold '/': `judge/latency_s` is exported
    as judge_latency_s, with the metric's name (docs/design.md, "Metric names") in the description."""

    def __init__(self) -> None:
        self.latency = metrics.Histogram(
            "judge_latency_s", description="judge/latency_s: seconds one judgment took (cache hits included)",
            boundaries=[0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30])
        self.failures = metrics.Counter("judge_failures", description="judge/failures: judgments without a verdict")
        self.hit_rate = metrics.Gauge("judge_cache_hit_rate", description="judge/cache_hit_rate: verdict cache hits / lookups")

    def record(self, result: RewardResult, cache: VerdictCache) -> None:
        if result.judge_latency_s:
            self.latency.observe(result.judge_latency_s)
        if not result.judge_ok:
            self.failures.inc()
        self.hit_rate.set(cache.stats()["cache_hit_rate"])


api = FastAPI(title="deepeyes judge")
BodyT = TypeVar("BodyT", bound=BaseModel)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    # the handlers read the raw request (token first), so the schema is stated for the docs
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse({"error": {"message": exc.detail, "type": "invalid_request_error",
                                   "param": exc.param, "code": None}}, status_code=exc.status_code)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, without echoing the input: FastAPI's own handler echoed it and
    failed to encode a NaN (a 500), and a caller's input is not ours to reflect back."""
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


@serve.deployment
@serve.ingress(api)
class JudgeService:
    """Scores finished episodes with the configured judge backend and the DeepEyes reward.

    Invariant: a score is either a verdict-backed reward or an explicit failure (judge_ok=False,
    the cause named, counted in judge/failures) handled here by judge.failure_policy (raise,
    drop=True, or rule-scored), never a silent zero; identical concurrent requests in one replica
    share one judgment (verdict cache + in-flight dedupe).
    """

    def __init__(self, cfg: Config) -> None:
        if cfg.judge.backend == "hf":  # the only backend that computes here; torch costs 2 s to import
            import torch

            torch.set_num_threads(1)  # Ray gives fractional replicas 1 OMP thread; say so explicitly
        self.cfg = cfg
        # No reachability probe here: build_app probes once per deploy (see there).
        self.judge = make_judge(cfg.judge, cache_dir=cfg.model.cache_dir)
        # the local model behind the hf backend: the chat route, generate_calls, the health check
        self.generator: HFGenerator | None = self.judge.generator if isinstance(self.judge, HFJudge) else None
        self.cache = VerdictCache(cfg.judge.cache_size)
        self.token = bearer_token(cfg.serve.auth_token_env)
        self.results = self.failed_results = 0
        self._metrics = _Metrics() if cfg.logging.ray_metrics else None
        if self._metrics is not None:  # a gauge leaves the endpoint a report window after its last set()
            keep_gauge_fresh(lambda: self._metrics.hit_rate.set(self.cache.stats()["cache_hit_rate"]))

    # -- in-cluster API ---------------------------------------------------------------------

    async def score(self, request: ScoreRequest) -> RewardResult:
        """The reward of one finished episode, judge.failure_policy applied to a failed judgment.

        Raises:
            JudgeFailure: the judgment failed and judge.failure_policy=fail.
        """
        result = await score_episode(request, self.judge, self.cfg.judge, self.cache)
        self.results += 1
        self.failed_results += not result.judge_ok
        if self._metrics is not None:
            self._metrics.record(result, self.cache)
        if result.judge_ok:
            return result
        # failure_policy=rule matches on the question, which can be long: not on the event loop
        return await asyncio.to_thread(apply_failure_policy, result, request, self.cfg.judge)

    async def stats(self) -> dict[str, Any]:
        """Counters: calls, retries, unparseable, failures, cache hits/misses/hit rate, results."""
        out = judge_stats(self.judge, self.cache)
        out.update(results=self.results, failed_results=self.failed_results, pid=os.getpid())
        if self.generator is not None:
            out["generate_calls"] = self.generator.generate_calls
        return out

    async def check(self) -> list[str]:
        """Probe the remote judge now (model ids it lists; [] for local backends)."""
        return await check_reachable(self.cfg.judge)

    async def check_health(self) -> None:
        error = self.generator.worker_error() if self.generator is not None else None
        if error is not None:
            raise RuntimeError(f"hf judge batching worker died: {error!r}")

    # -- HTTP -------------------------------------------------------------------------------

    def _auth(self, header: str | None) -> None:
        if not authorized(header, self.token):
            raise HTTPException(401, f"missing or wrong bearer token (set by ${self.cfg.serve.auth_token_env})")

    async def _authorized_body(self, request: Request, model: type[BodyT]) -> BodyT:
        """The token first, then the body: a caller without the token gets a 401 before a byte
        of its body is read (FastAPI parses a typed body parameter before any handler code)."""
        self._auth(request.headers.get("authorization"))
        return await read_json_body(request, model, self.cfg.serve.max_request_bytes, "serve.max_request_bytes")

    @api.post("/score", openapi_extra=_body_schema(ScoreBody))
    async def score_http(self, request: Request) -> dict[str, Any]:
        body = await self._authorized_body(request, ScoreBody)
        try:
            return (await self.score(ScoreRequest(**body.model_dump()))).to_dict()
        except JudgeFailure as e:
            raise HTTPException(503, str(e)) from None

    def _generator(self) -> HFGenerator:
        generator = self.generator
        if generator is None:
            raise OpenAIError(404, f"the chat route needs an LLM judge backend and fronts the hf one; "
                                   f"this service runs judge.backend={self.cfg.judge.backend}, which has "
                                   f"no model (set judge.backend=hf)")
        return generator

    @api.get("/v1/models")
    async def models(self, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        self._auth(authorization)
        self._generator()
        return {"object": "list", "data": [{"id": self.cfg.judge.hf_model_path, "object": "model",
                                            "created": 0, "owned_by": "deepeyes-ray"}]}

    @api.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(self, request: Request) -> dict[str, Any]:
        body = await self._authorized_body(request, ChatCompletionRequest)
        generator = self._generator()
        body.refuse_unsupported()
        jc = self.cfg.judge
        text, prompt_tokens, completion_tokens, finish_reason = await generator.generate(
            [{"role": m.role, "content": m.text()} for m in body.messages],
            body.max_completion_tokens or body.max_tokens or jc.max_tokens,
            jc.temperature if body.temperature is None else body.temperature)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion",
            "created": int(time.time()), "model": body.model or jc.hf_model_path,
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder: args {"config": scenario YAML, "overrides": [key=value, ...]}."""
    cfg = config_from_args(args)
    if cfg.judge.check_at_startup:
        # The one start-up probe: once per deploy (not per replica start), and `serve.run` /
        # `serve deploy` report the unreachable URL itself rather than a failed replica.
        _run_now(check_reachable(cfg.judge))
    return JudgeService.options(**deployment_options(cfg.serve.judge, cfg.serve.access_log)).bind(cfg)


T = TypeVar("T")


def _run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, also when the caller has a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
