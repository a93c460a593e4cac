"""Judge backends: rule matching, verdict parsing, the openai backend against a real loopback HTTP
server that plays an OpenAI-compatible judge, the hf backend on the tiny text model, serve-llm config.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deepeyes.config import JudgeConfig
from services.judge.backends import (JudgeUnavailable, OpenAIJudge, RuleJudge, check_reachable,
                                     judge_messages, parse_options, parse_verdict, rule_match,
                                     serve_llm_config)
from services.judge.factory import make_judge
from deepeyes.contracts import ScoreRequest
from services.judge.scoring import score

pytestmark = pytest.mark.timeout(60)


# --- rule backend ------------------------------------------------------------------------------

OPTS_Q = "What colour is the star in the top-left corner? (A) red (B) blue (C) dark green (D) white"


@pytest.mark.parametrize("question,reference,answer,expected", [
    (OPTS_Q, "B", "blue", True),               # letter reference, text answer
    (OPTS_Q, "blue", "B", True),               # text reference, letter answer
    (OPTS_Q, "C", "(C) dark green", True),
    (OPTS_Q, "C", "C. Dark Green", True),
    (OPTS_Q, "(B)", "b", True),
    (OPTS_Q, "B", "red", False),
    (OPTS_Q, "B", "A", False),
    (OPTS_Q, "blue", "(A) red", False),
    (OPTS_Q, "B", "purple", False),             # no such option
    ("Which shape?\nA. circle\nB. square\nC. star", "A", "circle", True),
    ("Which shape?\nA. circle\nB. square\nC. star", "square", "B", True),
    ("Is the door open?", "yes", "Yes, it is open.", True),
    ("Is the door open?", "yes", "No.", False),
    ("Is the door open?", "no", "not sure", False),
    ("How many cats?", "3", "3.0", True),
    ("How many cats?", "3", "three", True),
    ("How many cats?", "3", "4", False),
    ("What is the population?", "1,200", "1200", True),
    ("What share?", "50%", "50", True),
    ("What word is on the sign?", "BAKERY", "the bakery.", True),
    ("What word is on the sign?", "BAKERY", "BUTCHER", False),
    ("What word is on the sign?", "", "", False),
])
def test_rule_match(question, reference, answer, expected):
    assert rule_match(question, reference, answer) is expected


def test_parse_options():
    assert parse_options(OPTS_Q) == {"A": "red", "B": "blue", "C": "dark green", "D": "white"}
    assert parse_options("How many? (A) 3") == {}  # one option is not a list of options


def test_rule_judge_verdict():
    v = asyncio.run(RuleJudge().judge(OPTS_Q, "B", "blue"))
    assert v.ok and v.correct is True


# --- prompt and verdict parsing ----------------------------------------------------------------

@pytest.mark.parametrize("reply,expected", [
    ("CORRECT", True), ("INCORRECT", False), ("Correct.", True), (" incorrect\n", False),
    ("Verdict: INCORRECT", False), ("CORRECTLY", None), ("maybe", None), ("", None),
    ("CORRECT or INCORRECT", None), ("INCORRECTNESS", None),
])
def test_parse_verdict_word_boundaries(reply, expected):
    assert parse_verdict(reply) is expected


def test_judge_prompt_shape():
    msgs = judge_messages("Q?", "REF", "ANS")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "CORRECT or INCORRECT" in msgs[0]["content"]
    user = msgs[1]["content"]
    assert user.count("Verdict: CORRECT") >= 1 and user.count("Verdict: INCORRECT") >= 1
    assert user.rstrip().endswith("Question: Q?\nReference answer: REF\nModel answer: ANS\nVerdict:")


# --- openai backend against a real loopback server ---------------------------------------------

class LoopbackJudgeServer:
    """A real HTTP server on 127.0.0.1 playing an OpenAI-compatible judge. `script` is a list of
    actions consumed one per POST (the last one repeats): ("reply", text), ("slow", seconds),
    ("status", code)."""

    def __init__(self, script, models=("judge-x",)):
        self.script = list(script)
        self.models = list(models)
        self.posts: list[dict] = []
        self.auth: list[str | None] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in outer.models]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.posts.append(body)
                    outer.auth.append(self.headers.get("Authorization"))
                    action = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    kind, arg = action
                    if kind == "slow":
                        time.sleep(arg)
                        kind, arg = "reply", "CORRECT"
                    if kind == "status":
                        self._send(arg, {"error": {"message": f"scripted {arg}", "type": "server_error"}})
                        return
                    if kind == "delay-reply":
                        time.sleep(arg[0])
                        arg = arg[1]
                    self._send(200, {"id": "c1", "object": "chat.completion", "created": 0,
                                     "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": arg}}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left
                finally:
                    with outer._lock:
                        outer.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(script, **kw):
        s = LoopbackJudgeServer(script, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def cfg_for(url: str, **kw) -> JudgeConfig:
    base = dict(backend="openai", base_url=url, timeout_s=2.0, max_retries=2, backoff_s=0.01)
    base.update(kw)
    return JudgeConfig(**base)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there any more


def test_openai_canned_verdicts_model_discovery_and_key(server_factory, monkeypatch):
    srv = server_factory([("reply", "CORRECT"), ("reply", "INCORRECT")])
    monkeypatch.delenv("DEEPEYES_JUDGE_API_KEY", raising=False)
    judge = make_judge(cfg_for(srv.url))
    v1 = asyncio.run(judge.judge("Q?", "B", "blue"))
    v2 = asyncio.run(judge.judge("Q?", "B", "red"))
    assert (v1.ok, v1.correct, v1.raw) == (True, True, "CORRECT")
    assert (v2.ok, v2.correct) == (True, False)
    assert srv.posts[0]["model"] == "judge-x"            # discovered from GET /models
    assert srv.posts[0]["temperature"] == pytest.approx(0.1)
    assert srv.posts[0]["messages"] == judge_messages("Q?", "B", "blue")
    assert srv.auth[0] == "Bearer EMPTY"
    monkeypatch.setenv("DEEPEYES_JUDGE_API_KEY", "sk-test")
    asyncio.run(make_judge(cfg_for(srv.url, model="judge-x")).judge("Q?", "B", "blue"))
    assert srv.auth[-1] == "Bearer sk-test"
    assert judge.stats() == {"backend": "openai", "calls": 2, "retries": 0, "unparseable": 0, "failures": 0}


def test_openai_timeouts_are_retried_then_fail(server_factory):
    srv = server_factory([("slow", 3.0)])
    judge = OpenAIJudge(cfg_for(srv.url, model="judge-x", timeout_s=0.3, max_retries=2))
    v = asyncio.run(judge.judge("Q?", "B", "blue"))
    assert not v.ok and v.correct is None
    assert "timed out" in v.error and srv.url in v.error
    assert len(srv.posts) == 3
    assert judge.stats()["retries"] == 2 and judge.stats()["failures"] == 1


def test_openai_5xx_retried_then_recovers(server_factory):
    srv = server_factory([("status", 500), ("status", 503), ("reply", "CORRECT")])
    judge = OpenAIJudge(cfg_for(srv.url, model="judge-x", max_retries=3))
    v = asyncio.run(judge.judge("Q?", "B", "blue"))
    assert v.ok and v.correct is True
    assert len(srv.posts) == 3 and judge.stats()["retries"] == 2


def test_openai_5xx_forever_fails_after_max_retries(server_factory):
    srv = server_factory([("status", 500)])
    judge = OpenAIJudge(cfg_for(srv.url, model="judge-x", max_retries=3))
    v = asyncio.run(judge.judge("Q?", "B", "blue"))
    assert not v.ok and "HTTP 500" in v.error and "4 attempts" in v.error
    assert len(srv.posts) == 4  # the openai client's own retries are off: 1 + 3 of ours


def test_openai_4xx_is_not_retried(server_factory):
    srv = server_factory([("status", 401)])
    judge = OpenAIJudge(cfg_for(srv.url, model="judge-x", max_retries=3))
    v = asyncio.run(judge.judge("Q?", "B", "blue"))
    assert not v.ok and "401" in v.error and "DEEPEYES_JUDGE_API_KEY" in v.error
    assert len(srv.posts) == 1


def test_openai_garbage_is_retried_once_then_a_failure(server_factory):
    srv = server_factory([("reply", "I think the answer is fine")])
    judge = OpenAIJudge(cfg_for(srv.url, model="judge-x"))
    v = asyncio.run(judge.judge("Q?", "B", "blue"))
    assert not v.ok and v.correct is None and "unparseable" in v.error
    assert len(srv.posts) == 2
    assert judge.stats()["unparseable"] == 2 and judge.stats()["failures"] == 1
    # garbage once, then a verdict: one unparseable, no failure
    srv2 = server_factory([("reply", "hmm"), ("reply", "INCORRECT")])
    judge2 = OpenAIJudge(cfg_for(srv2.url, model="judge-x"))
    v2 = asyncio.run(judge2.judge("Q?", "B", "blue"))
    assert v2.ok and v2.correct is False and judge2.stats()["unparseable"] == 1


def test_openai_server_down(monkeypatch):
    url = closed_port_url()
    judge = OpenAIJudge(cfg_for(url, model="judge-x", max_retries=2))
    v = asyncio.run(judge.judge("Q?", "B", "blue"))
    assert not v.ok and url in v.error and "connection error" in v.error
    assert judge.stats()["calls"] == 3 and judge.stats()["failures"] == 1


def test_openai_concurrency_is_bounded(server_factory):
    srv = server_factory([("delay-reply", (0.2, "CORRECT"))])
    judge = OpenAIJudge(cfg_for(srv.url, model="judge-x", concurrency=2))

    async def go():
        return await asyncio.gather(*(judge.judge("Q?", "B", f"blue {i}") for i in range(6)))

    verdicts = asyncio.run(go())
    assert all(v.ok for v in verdicts)
    assert srv.max_in_flight == 2


def test_score_through_openai_judge(server_factory):
    srv = server_factory([("reply", "CORRECT")])
    cfg = cfg_for(srv.url)
    request = ScoreRequest("<think>Zoom.</think><tool_call>{}</tool_call><think>ok</think><answer>blue</answer>",
                           OPTS_Q, "B", tool_calls=1, crops=1)
    r = asyncio.run(score(request, make_judge(cfg), cfg))
    assert r.judge_ok and r.score == pytest.approx(2.0)
    down = cfg_for(closed_port_url(), max_retries=1)
    r2 = asyncio.run(score(request, make_judge(down), down))
    assert not r2.judge_ok and down.base_url in r2.failure


def test_check_reachable(server_factory):
    srv = server_factory([("reply", "CORRECT")], models=("judge-x", "other"))
    assert asyncio.run(check_reachable(cfg_for(srv.url))) == ["judge-x", "other"]
    with pytest.raises(JudgeUnavailable, match="does not serve judge.model='nope'"):
        asyncio.run(check_reachable(cfg_for(srv.url, model="nope")))
    url = closed_port_url()
    with pytest.raises(JudgeUnavailable, match=url.replace(".", r"\.")):
        asyncio.run(check_reachable(cfg_for(url)))
    assert asyncio.run(check_reachable(JudgeConfig(backend="rule"))) == []


# --- serve-llm config --------------------------------------------------------------------------

def test_serve_llm_config_builds_a_valid_llm_config():
    cfg = JudgeConfig(backend="serve-llm")
    d = serve_llm_config(cfg, accelerator_type="H100")
    assert d["model_loading_config"] == {"model_id": "judge", "model_source": "Qwen/Qwen2.5-72B-Instruct"}
    assert d["engine_kwargs"]["tensor_parallel_size"] == 8
    try:  # the public class needs vLLM to import; its parent (the same pydantic model) does not
        from ray.serve.llm import LLMConfig
    except ImportError:
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    llm = LLMConfig(**d)
    assert llm.model_loading_config.model_source == "Qwen/Qwen2.5-72B-Instruct"
    assert llm.engine_kwargs["tensor_parallel_size"] == 8
    judge = make_judge(cfg)
    assert isinstance(judge, OpenAIJudge) and judge._model == "judge"


# --- hf backend on the tiny text model ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_text_dir(tmp_path_factory):
    import os

    from services.judge.hf import tiny_text_model_path

    cache = os.environ.get("DEEPEYES_TEST_CACHE") or str(tmp_path_factory.mktemp("judge-cache"))
    return tiny_text_model_path(cache)


def test_tiny_text_model_is_cached_and_deterministic(tiny_text_dir, tmp_path):
    from services.judge.hf import build_tiny_text_model, tiny_text_model_path

    assert tiny_text_model_path(str(tiny_text_dir.parent)) == tiny_text_dir
    again = build_tiny_text_model(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_text_dir / "model.safetensors").read_bytes()


def test_hf_judge_batches_and_counts(tiny_text_dir):
    import torch

    from services.judge.hf import HFJudge

    torch.set_num_threads(1)
    cfg = JudgeConfig(backend="hf", temperature=0.0, max_tokens=4)
    judge = HFJudge(cfg, str(tiny_text_dir.parent))
    gen = judge.generator
    msgs = [judge_messages("Q?", "B", f"answer {i}") for i in range(6)]

    async def together():
        return await asyncio.gather(*(gen.generate(m, 4, 0.0) for m in msgs))

    batched = asyncio.run(together())
    calls_batched = gen.generate_calls
    single = [asyncio.run(gen.generate(m, 4, 0.0)) for m in msgs]
    assert calls_batched < len(msgs)                     # requests shared generate calls
    assert [b[0] for b in batched] == [s[0] for s in single]  # greedy: same text batched or not
    assert all(b[2] <= 4 for b in batched)
    v = asyncio.run(judge.judge("Q?", "B", "blue"))
    st = judge.stats()
    # A random-init model rarely says CORRECT/INCORRECT: either way the counters must agree.
    assert st["calls"] == (1 if v.ok else 2) and st["unparseable"] == (0 if v.ok else 2)
    assert v.ok or "unparseable" in v.error


def test_verdict_constraint_per_server():
    from services.judge.backends import verdict_constraint

    assert verdict_constraint("off") is None
    assert verdict_constraint("choice") == {"structured_outputs": {"choice": ["CORRECT", "INCORRECT"]}}
    import re

    rx = re.compile(verdict_constraint("regex")["regex"])
    assert rx.fullmatch("CORRECT") and rx.fullmatch("INCORRECT") and not rx.fullmatch("MAYBE")
