"""Chaos, service side (issue 12): the main job while its judge server fails half of its calls.
(The rollout replica killed mid-step shares the run of tests/chaos/test_faults.py's three faults.)

The judge server here is a stand-in (`HalfFailingJudge`, a real HTTP server speaking the OpenAI
chat API): a 72B judge cannot run on this machine, and a fault has to be injected somewhere. It
answers CORRECT, or HTTP 500 for every prompt whose SHA-256 is odd, so which judgments fail is a
function of their content and the test can count them on both sides.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_faults import job, metric_steps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


class HalfFailingJudge(BaseHTTPRequestHandler):
    """OpenAI chat stand-in: CORRECT, or 500 when the prompt's SHA-256 is odd. Counts both."""

    ok = failed = 0
    lock = threading.Lock()

    def log_message(self, *args):  # quiet
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "stand-in", "object": "model", "created": 0,
                                                     "owned_by": "test"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = json.dumps(body["messages"], sort_keys=True)
        fail = hashlib.sha256(prompt.encode()).digest()[-1] % 2 == 1
        with self.lock:
            if fail:
                HalfFailingJudge.failed += 1
            else:
                HalfFailingJudge.ok += 1
        if fail:
            return self._json(500, {"error": {"message": "injected fault", "type": "server_error"}})
        self._json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "stand-in",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "CORRECT"}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def test_a_judge_failing_half_its_calls_drops_and_counts_each_failure(tmp_path, tiny_policy_dir):
    """Every failed judgment is counted (judge/failures, val/judge_failures: their sum equals the
    server's 500s, since judge.max_retries=0 and failures are never cached) and dropped from the
    update, never scored as a zero; the run goes on to its last step."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HalfFailingJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run_dir = tmp_path / "run"
    try:
        proc = subprocess.run(job(run_dir, str(tiny_policy_dir.parent), "trainer.steps=4", "judge.backend=openai",
                                  f"judge.base_url=http://127.0.0.1:{server.server_address[1]}/v1",
                                  "judge.max_retries=0", "judge.stop_after_steps=0", "trainer.test_every=2",
                                  "logging.save_trajectories=8"),
                              capture_output=True, text=True, timeout=600)
    finally:
        server.shutdown()
    (tmp_path / "job.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    log = proc.stdout + proc.stderr  # each validation is reported once (it was printed twice)
    assert [log.count(f"validation at step {k}:") for k in (2, 4)] == [1, 1], log[-3000:]
    rows = metric_rows(run_dir)
    counted = sum(r.get("judge/failures", 0) + r.get("val/judge_failures", 0) for r in rows)
    assert HalfFailingJudge.failed > 0 and HalfFailingJudge.ok > 0
    assert counted == HalfFailingJudge.failed, (counted, HalfFailingJudge.failed, HalfFailingJudge.ok)
    # no episode lost, no silent zero: each step's 4 episodes are either trained on with a verdict
    # or counted as a failed judgment and dropped; every kept (and saved) one carries the verdict
    steps = [r for r in rows if "reward/score" in r]
    assert all(r["rollout/episodes"] + r["judge/failures"] == 4 for r in steps), steps
    assert all(r["reward/acc"] == 1.0 for r in steps if r["rollout/episodes"])  # the stand-in said CORRECT
    saved = [json.loads(l) for f in sorted((run_dir / "trajectories").glob("*.jsonl"))
             for l in f.read_text().splitlines() if l.strip()]
    assert saved and all(t["reward"]["judge_ok"] and t["reward"]["acc"] == 1.0 for t in saved)
