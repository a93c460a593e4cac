"""Scoring one episode: extract, check format and length, math check, judge (cached), combine.

`score(request, judge, cfg, cache)` and `apply_failure_policy(result, request, cfg)` are the pure
core the judge service wraps (it counts the failure in `judge/failures` between the two). No
silent zeros: a judge that cannot be reached or keeps failing gives RewardResult(judge_ok=False,
failure=cause) with NaN score, and the failure policy (cfg.failure_policy) decides what it becomes:
`fail` raises JudgeFailure, `drop` flags it (drop=True), `rule` rescores it with the rule judge.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

from deepeyes.config import JudgeConfig
from services.judge.backends import Judge, Verdict, rule_match
from services.judge.reward import (RewardResult, ScoreRequest, combine, extract_answer, failed,
                                   had_format_error, read_format, searched, tool_used)

CacheKey = tuple[str, str, str]


class JudgeFailure(RuntimeError):
    """judge.failure_policy=fail and a judgment failed; the message names the cause and the fix."""


def math_equal(reference: str, answer: str) -> bool:
    """math-verify's verdict that `answer` (e.g. `\\boxed{1/2}`) equals `reference`; False when
    either side does not parse (the judge then decides). Timeouts are off: math-verify's use
    signal.alarm, which only works in the main thread (Serve runs handlers elsewhere); answers
    reaching here are already capped at max_answer_chars."""
    from math_verify import parse, verify  # math_verify (sympy): heavy, only math answers

    try:
        gold = parse(reference, parsing_timeout=None) or parse(f"${reference}$", parsing_timeout=None)
        pred = parse(answer, parsing_timeout=None)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=None))
    except Exception:  # math-verify on odd input: undecided, the judge decides
        return False


def is_math_row(data_source: str) -> bool:
    return data_source.startswith("thinklite")


class VerdictCache:
    """LRU of verdicts keyed on (question, reference, normalised answer), plus in-flight dedupe:
    identical concurrent requests share one judgment. Only decided verdicts are stored (a failure
    is retried by the next request). Single event loop (one per replica)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lru: OrderedDict[CacheKey, Verdict] = OrderedDict()
        self._inflight: dict[CacheKey, asyncio.Future] = {}
        self.hits = self.misses = self.shared = 0

    @staticmethod
    def key(question: str, reference: str, answer: str) -> CacheKey:
        # Light normalisation only (case, spaces, a final period): the LLM judge would not tell
        # these apart, while anything it might is kept distinct.
        norm = re.sub(r"\s+", " ", answer.strip().casefold()).rstrip(".")
        return (question.strip(), reference.strip(), norm)

    async def get_or_judge(self, key: CacheKey, judge_fn: Callable[[], Awaitable[Verdict]]) -> tuple[Verdict, bool]:
        """-> (verdict, came from the cache or a shared in-flight judgment)."""
        if key in self._lru:
            self._lru.move_to_end(key)
            self.hits += 1
            return self._lru[key], True
        pending = self._inflight.get(key)
        if pending is not None:
            self.hits += 1
            self.shared += 1
            return await asyncio.shield(pending), True
        self.misses += 1
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" noise
        self._inflight[key] = fut
        try:
            verdict = await judge_fn()
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            self._inflight.pop(key, None)
        if verdict.ok and self.size > 0:
            self._lru[key] = verdict
            while len(self._lru) > self.size:
                self._lru.popitem(last=False)
        fut.set_result(verdict)
        return verdict, False

    def stats(self) -> dict[str, Any]:
        lookups = self.hits + self.misses
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_shared_inflight": self.shared,
                "cache_entries": len(self._lru), "cache_hit_rate": self.hits / lookups if lookups else 0.0}


def _read_response(text: str, cfg: JudgeConfig) -> tuple[str | None, bool]:
    return extract_answer(text), read_format(text, cfg)


async def score(request: ScoreRequest, judge: Judge, cfg: JudgeConfig,
                cache: VerdictCache | None = None) -> RewardResult:
    """The DeepEyes reward of one finished episode (see services/judge/reward.py for the rule)."""
    # Off the event loop: a response of hundreds of KB must not stall the replica's other requests.
    answer, fmt_error = await asyncio.to_thread(_read_response, request.response_text, cfg)
    used, search = tool_used(request, cfg), searched(request, cfg)
    if answer is None:
        return combine(0.0, fmt_error, used, cfg, search=search)
    if len(answer) >= cfg.max_answer_chars:  # length hacking of an LLM judge: never judged
        return combine(0.0, True, used, cfg, search=search, answer=answer)
    if cfg.math_checker and is_math_row(request.data_source):
        if await asyncio.to_thread(math_equal, request.ground_truth, answer):
            return combine(1.0, fmt_error, used, cfg, search=search, answer=answer)

    start = time.perf_counter()
    ask = lambda: judge.judge(request.question, request.ground_truth, answer)  # noqa: E731
    if cache is None:
        verdict, cached = await ask(), False
    else:
        verdict, cached = await cache.get_or_judge(
            cache.key(request.question, request.ground_truth, answer), ask)
    latency = time.perf_counter() - start
    if not verdict.ok:
        return failed(fmt_error, verdict.error, cfg, answer=answer, cached=cached, judge_latency_s=latency)
    return combine(1.0 if verdict.correct else 0.0, fmt_error, used, cfg, search=search, answer=answer,
                   cached=cached, judge_latency_s=latency)


def apply_failure_policy(result: RewardResult, request: ScoreRequest, cfg: JudgeConfig) -> RewardResult:
    """cfg.failure_policy on a failed judgment: `fail` raises JudgeFailure, `drop` returns it with
    drop=True (the trainer leaves the episode out of the update), `rule` rescores it with the rule
    judge. judge_ok stays False in both, so the failure is still counted. Successful results pass
    through unchanged."""
    if result.judge_ok:
        return result
    if cfg.failure_policy == "fail":
        raise JudgeFailure(f"judge failed on a sample: {result.failure}. Fix the judge (see "
                           f"judge.base_url / judge.backend) or set judge.failure_policy=drop or rule")
    if cfg.failure_policy == "drop":
        return dataclasses.replace(result, drop=True)
    acc = 1.0 if rule_match(request.question, request.ground_truth, result.answer or "") else 0.0
    return combine(acc, had_format_error(result, cfg), tool_used(request, cfg), cfg, search=searched(request, cfg),
                   judge_ok=False,
                   failure=f"{result.failure} (scored by the rule judge)", answer=result.answer,
                   cached=result.cached, judge_latency_s=result.judge_latency_s)


def stats(judge: Judge, cache: VerdictCache | None) -> dict[str, Any]:
    """Counters of a judge and its cache: calls, retries, unparseable, failures, cache hits/misses."""
    out: dict[str, Any] = dict(judge.stats())
    out.update(cache.stats() if cache is not None else VerdictCache(0).stats())
    return out
