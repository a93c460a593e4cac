"""The judge behind a real inference server: vLLM's OpenAI server (the CPU twin of the reference
sglang command) with the tiny text judge, started as a child process and stopped by PID.

The verdicts are checked against a value computed another way: the same model in transformers,
greedy-decoded under the same CORRECT/INCORRECT constraint the server applies.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from deepeyes.config import JudgeConfig
from services.judge.backends import VERDICT_WORDS, JudgeUnavailable, OpenAIJudge, check_reachable, judge_messages
from services.judge.local_server import LocalOpenAIServer
from deepeyes.contracts import ScoreRequest
from services.judge.scoring import VerdictCache, score
from judge_reference import CASES, hf_constrained_verdict
from raycli import free_port

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    import os

    from services.judge.hf import tiny_text_model_path

    cache = os.environ.get("DEEPEYES_TEST_CACHE") or str(tmp_path_factory.mktemp("judge-cache"))
    return tiny_text_model_path(cache)


@pytest.fixture(scope="module")
def server(judge_dir, tmp_path_factory):
    srv = LocalOpenAIServer(judge_dir, free_port(), tmp_path_factory.mktemp("judge-server") / "server.log")
    with srv:
        yield srv
    assert srv.proc.poll() is not None  # stopped by PID, nothing left behind


def cfg_for(server, **kw) -> JudgeConfig:
    base = dict(backend="openai", base_url=server.base_url, model="judge", temperature=0.0,
                constrain="choice", max_retries=1, backoff_s=0.05, timeout_s=60.0)
    return JudgeConfig(**{**base, **kw})


def test_startup_probe_finds_the_server_and_names_a_wrong_model(server):
    assert asyncio.run(check_reachable(cfg_for(server))) == ["judge"]
    with pytest.raises(JudgeUnavailable, match="judge.model='other'"):
        asyncio.run(check_reachable(cfg_for(server, model="other")))


def test_verdicts_from_the_real_server_equal_transformers(server, judge_dir):
    judge = OpenAIJudge(cfg_for(server))

    async def all_cases():
        return await asyncio.gather(*(judge.judge(q, r, a) for q, r, a in CASES))

    verdicts = asyncio.run(all_cases())
    assert all(v.ok and v.raw in VERDICT_WORDS for v in verdicts), [v.raw for v in verdicts]
    expected = [hf_constrained_verdict(judge_dir, judge_messages(q, r, a)) for q, r, a in CASES]
    assert [v.correct for v in verdicts] == expected
    assert judge.stats()["calls"] == len(CASES) and judge.stats()["failures"] == 0


def test_real_episodes_score_through_the_server(server, judge_dir):
    cfg = cfg_for(server)
    judge, cache = OpenAIJudge(cfg), VerdictCache(1024)
    q, ref, ans = CASES[0]
    correct = hf_constrained_verdict(judge_dir, judge_messages(q, ref, ans))
    episodes = [  # (response text, tool calls, crops)
        (f"<think>look closer</think><tool_call>{{}}</tool_call><think>ok</think><answer>{ans}</answer>", 1, 1),
        (f"<answer>{ans}</answer>", 0, 0),
        ("<think>only thinking, nothing after it</think>", 0, 0),  # nothing to judge
    ]

    async def run():
        return await asyncio.gather(*(score(ScoreRequest(text, q, ref, "vstar", calls, crops), judge, cfg, cache)
                                      for text, calls, crops in episodes))

    with_tool, plain, no_answer = asyncio.run(run())
    acc = 1.0 if correct else 0.0
    assert (with_tool.acc, with_tool.tool, with_tool.format) == (acc, acc, 0.0)
    assert with_tool.score == pytest.approx(0.8 * acc + 1.2 * acc)
    assert plain.score == pytest.approx(0.8 * acc) and plain.tool == 0.0
    assert no_answer.score == pytest.approx(-0.2) and no_answer.judge_ok
    st = cache.stats()
    assert judge.stats()["calls"] == 1 and st["cache_misses"] == 1  # two identical answers, one judgment


def test_timeouts_are_retried_counted_and_surfaced(server):
    judge = OpenAIJudge(cfg_for(server, timeout_s=0.001, max_retries=2))
    v = asyncio.run(judge.judge(*CASES[0]))
    assert not v.ok and "timed out after 0.001 s (judge.timeout_s)" in v.error
    st = judge.stats()
    assert (st["calls"], st["retries"], st["failures"]) == (3, 2, 1)
    assert math.isnan(asyncio.run(score(ScoreRequest("<answer>red</answer>", *CASES[0][:2]), judge,
                                        cfg_for(server, timeout_s=0.001, max_retries=0))).score)


def test_a_stopped_server_is_a_connection_error_not_a_zero(server):
    # Last in this file: it stops the module's server (a second start of vLLM cost the suite 38 s);
    # stop is idempotent, the fixture's teardown still checks nothing was left behind.
    url = server.base_url
    server.stop()
    judge = OpenAIJudge(JudgeConfig(backend="openai", base_url=url, model="judge", max_retries=1, backoff_s=0.01))
    v = asyncio.run(judge.judge(*CASES[1]))
    assert not v.ok and "connection error" in v.error and judge.stats()["calls"] == 2
