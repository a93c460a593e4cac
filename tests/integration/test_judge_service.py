"""The judge Serve app: the official openai client against its chat route, `score` via a handle,
the start-up check failing fast on an unreachable judge, and the failure policy in the service."""

from __future__ import annotations

import asyncio
import math
import os
import socket

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def judge_app(ray_cluster, tmp_path_factory):
    from ray import serve

    from services.judge.app import build_app

    cache = os.environ.get("DEEPEYES_TEST_CACHE") or str(tmp_path_factory.mktemp("judge-app-cache"))
    handle = serve.run(build_app({"overrides": ["judge.backend=hf", f"model.cache_dir={cache}",
                                                "judge.temperature=0.0", "judge.max_tokens=4",
                                                "serve.judge.num_cpus=0.25"]}),
                       name="judge", route_prefix="/judge")
    yield {"handle": handle, "base_url": f"http://127.0.0.1:{ray_cluster['http_port']}/judge/v1"}
    serve.delete("judge")


def test_chat_route_answers_the_official_openai_client(judge_app):
    from openai import OpenAI

    client = OpenAI(base_url=judge_app["base_url"], api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny-text"]
    resp = client.chat.completions.create(
        model="tiny-text", max_tokens=3, temperature=0.0,
        messages=[{"role": "system", "content": "Reply with one word."},
                  {"role": "user", "content": "Is the answer correct?"}])
    assert isinstance(resp.choices[0].message.content, str)
    assert 1 <= resp.usage.completion_tokens <= 3 and resp.usage.prompt_tokens > 5


def test_openai_backend_against_the_service_route(judge_app):
    from deepeyes.config import JudgeConfig
    from services.judge.factory import make_judge

    judge = make_judge(JudgeConfig(backend="openai", base_url=judge_app["base_url"], timeout_s=60,
                                   max_retries=0))
    v = asyncio.run(judge.judge("What colour?", "blue", "blue"))
    # A random tiny model rarely says the verdict word: a decided verdict or a counted unparseable.
    assert v.ok or ("unparseable" in v.error and judge.stats()["unparseable"] == 2)
    assert judge.stats()["calls"] == (1 if v.ok else 2)


def test_score_through_the_handle(judge_app):
    from deepeyes.contracts import ScoreRequest

    handle = judge_app["handle"]
    math_row = ScoreRequest("<think>3/6 = 1/2.</think><answer>\\boxed{\\frac{1}{2}}</answer>",
                            "Ratio of the bars 3 and 6?", "0.5", data_source="thinklite_eureka",
                            tool_calls=1, crops=1)
    r = handle.score.remote(math_row).result()
    assert r.judge_ok and r.score == pytest.approx(2.0)      # math checker, tool used: 0.8 + 1.2
    long = ScoreRequest("<answer>" + "z" * 1200 + "</answer>", "Q?", "z")
    assert handle.score.remote(long).result().score == pytest.approx(-0.2)
    judged = ScoreRequest("<think>t</think><answer>blue</answer>", "What colour?", "blue")
    before = handle.stats.remote().result()
    r3 = handle.score.remote(judged).result()
    after = handle.stats.remote().result()
    assert after["results"] == before["results"] + 1
    assert r3.judge_ok or "unparseable" in r3.failure
    assert after["failed_results"] == before["failed_results"] + (not r3.judge_ok)
    assert after["cache_misses"] == before["cache_misses"] + 1


def test_startup_check_fails_fast_naming_the_url(ray_cluster):
    from ray import serve

    from deepeyes.config import load_config
    from services.judge.app import JudgeService, build_app
    from services.judge.backends import JudgeUnavailable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"  # nothing listens there
    with pytest.raises(JudgeUnavailable, match=f"judge not reachable at {url}/models"):
        build_app({"overrides": ["judge.backend=openai", f"judge.base_url={url}", "judge.timeout_s=2"]})
    # The builder is the one probe: a replica bound directly (past it) starts, and each failed
    # judgment goes through judge.failure_policy in the service: counted, then dropped or raised.
    from deepeyes.contracts import ScoreRequest
    from services.judge.scoring import JudgeFailure

    request = ScoreRequest("<think>t</think><answer>blue</answer>", "What colour?", "blue")
    for policy in ("drop", "fail"):
        cfg = load_config(overrides=["judge.backend=openai", f"judge.base_url={url}", "judge.timeout_s=2",
                                     "judge.max_retries=0", f"judge.failure_policy={policy}"])
        handle = serve.run(JudgeService.options(num_replicas=1, ray_actor_options={"num_cpus": 0.1}).bind(cfg),
                           name="judge-down", route_prefix="/judge-down")
        try:
            if policy == "drop":
                r = handle.score.remote(request).result(timeout_s=60)
                assert r.drop and not r.judge_ok and url in r.failure and math.isnan(r.score)
            else:
                with pytest.raises(JudgeFailure, match=url.replace(".", r"\.")):
                    handle.score.remote(request).result(timeout_s=60)
            assert handle.stats.remote().result()["failed_results"] == 1
        finally:
            serve.delete("judge-down")


def test_score_route_over_http_with_a_bearer_token(ray_cluster):
    """`POST /judge/score` for callers outside the cluster; the token is read from the replica's env."""
    import httpx
    from ray import serve

    from deepeyes.config import load_config
    from services.judge.app import JudgeService

    cfg = load_config(overrides=["judge.backend=rule", "serve.auth_token_env=DEEPEYES_TEST_JUDGE_TOKEN"])
    opts = {"num_cpus": 0.1, "runtime_env": {"env_vars": {"DEEPEYES_TEST_JUDGE_TOKEN": "s3cret"}}}
    serve.run(JudgeService.options(num_replicas=1, ray_actor_options=opts).bind(cfg),
              name="judge-auth", route_prefix="/judge-auth")
    try:
        url = f"http://127.0.0.1:{ray_cluster['http_port']}/judge-auth/score"
        body = {"response_text": "<think>zoom</think><answer>(B) blue</answer>",
                "question": "What colour is the sign? (A) red (B) blue", "ground_truth": "blue",
                "tool_calls": 1, "crops": 1}
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        r = httpx.post(url, json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert r.status_code == 200
        # by hand: the rule judge maps "(B) blue" to blue = correct; tags fine; a crop came back
        # -> 0.8*1 + 0.2*0 + 1.2*1 = 2.0
        assert (r.json()["acc"], r.json()["format"], r.json()["tool"]) == (1.0, 0.0, 1.0)
        assert r.json()["score"] == pytest.approx(2.0)
        bad = httpx.post(url, json={"question": "q"}, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert bad.status_code == 422  # a malformed body is answered, not a crash
    finally:
        serve.delete("judge-auth")


def test_chat_route_honours_or_refuses_each_openai_parameter(judge_app):
    """Each parameter the official client sends is honoured or refused with a 400 naming it."""
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=judge_app["base_url"], api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Is the answer correct?"}]
    for kwargs, name in [({"stream": True}, "stream"), ({"n": 3}, "n"), ({"stop": ["\n"]}, "stop"),
                         ({"top_p": 0.5}, "top_p"), ({"logprobs": True}, "logprobs"), ({"seed": 1}, "seed"),
                         ({"extra_body": {"structured_outputs": {"choice": ["A"]}}}, "structured_outputs")]:
        with pytest.raises(openai.BadRequestError, match=name):
            out = client.chat.completions.create(model="tiny-text", messages=msgs, max_tokens=2, **kwargs)
            list(out) if kwargs.get("stream") else None
    capped = client.chat.completions.create(model="tiny-text", messages=msgs, max_completion_tokens=2)
    assert 1 <= capped.usage.completion_tokens <= 2
    # greedy on the random tiny model: its first token is not end-of-text, so one token is a cut
    cut = client.chat.completions.create(model="tiny-text", messages=msgs, max_tokens=1, temperature=0.0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 1
    parts = [{"type": "text", "text": "Is the answer"}, {"type": "text", "text": "correct?"}]
    as_parts = client.chat.completions.create(model="tiny-text", max_tokens=3, temperature=0.0,
                                              messages=[{"role": "user", "content": parts}])
    as_text = client.chat.completions.create(model="tiny-text", max_tokens=3, temperature=0.0,
                                             messages=[{"role": "user", "content": "Is the answer\ncorrect?"}])
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="tiny-text", messages=[{"role": "user", "content": image}])
