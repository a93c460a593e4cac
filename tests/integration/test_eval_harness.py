"""The evaluation harness end to end on the benchmark twins: `python -m trainer eval --twins` as a
user runs it (its own local Ray cluster, the three Serve apps, the tiny policy), with and without
the tool; checks eval.json, items.jsonl, the plots and the printed table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_eval_on_the_twins_with_and_without_the_tool(tmp_path, tiny_policy_dir):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "trainer", "eval", "--twins", "--twin-items", "3", "--k", "2",
           "--out", str(out), f"model.cache_dir={tiny_policy_dir.parent}", "model.warm_start=false",
           "rollout.max_new_tokens_per_turn=24", "rollout.max_response_length=256", "logging.progress=false",
           "ray.include_dashboard=false"]  # the dashboard: tested in test_deploy_job; 38 s a run here
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the cluster it started (its own session)
        stdout, stderr = proc.communicate()
        pytest.fail("eval did not finish in 240 s:\n" + stderr[-4000:])
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]

    summary = json.loads((out / "eval.json").read_text())
    assert summary["protocol"]["shuffle"] and summary["protocol"]["map_crops"] and summary["protocol"]["k"] == 2
    assert set(summary["benchmarks"]) == {"vstar", "hrbench_4k"}
    for bench, modes in summary["benchmarks"].items():
        assert set(modes) == {"tool", "no_tool"}
        for mode, s in modes.items():
            assert s["items"] == 3 and s["episodes"] == 6 and s["failed"] == 0
            assert 0.0 <= s["avg@k"] <= s["pass@k"] <= 1.0
        assert modes["no_tool"]["tool_use"] == 0.0 and modes["no_tool"]["calls_per_episode"] == 0.0
    assert set(summary["benchmarks"]["vstar"]["tool"]["categories"]) == {"direct_attributes", "relative_position"}
    assert set(summary["benchmarks"]["hrbench_4k"]["tool"]["categories"]) == {"single", "cross"}

    records = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 3 * 2  # benchmarks x modes x items x k
    for r in records:
        assert sorted(r["options_order"]) == list(range(len(r["options"])))
        assert r["options"][ord(r["correct_letter"]) - 65] == r["reference"]
        assert r["scored_by"] in ("rule", "judge", "judge_failed")
        if r["mode"] == "no_tool":
            assert not any(c["executed"] for c in r["tool_calls"])
    # both modes of a sample saw the same option order (a paired comparison)
    pairs = {}
    for r in records:
        pairs.setdefault((r["benchmark"], r["item"], r["sample"]), set()).add(tuple(r["options_order"]))
    assert all(len(v) == 1 for v in pairs.values())
    assert {p.name for p in (out / "plots").glob("*.png")} == {"vstar.png", "hrbench_4k.png"}
    assert "Avg@k" in stdout and "no_tool" in stdout and "hrbench_4k" in stdout
