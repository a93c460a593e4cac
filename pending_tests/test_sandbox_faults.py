"""Chaos, agentic tools: the tiny DeepEyesV2 job while its python sandbox replica is killed with
episodes holding kernels in it. The episodes that had a call in flight get an error turn, later
calls get a fresh kernel that says its state is gone, the step completes with all its episodes,
and no kernel process outlives the run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from bench.runner import process_cmdlines, start_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# the e2e test's shape (tests/e2e/test_agentic_job.py): the same cold start, cached once for both
SHAPE = ["rollout.n=2", "trainer.batch_size=2", "trainer.num_workers=2", "trainer.save_every=2",
         "data.synthetic_train_rows=8", "data.synthetic_val_rows=2", "trainer.sft_rows=32",
         "logging.progress=false", "ray.include_dashboard=false", "logging.save_trajectories=4"]
KERNEL_UID_FLOOR = 1_000_000  # each kernel runs under its own uid from here up (services/tools/sandbox/)


def kernels() -> list[int]:
    """PIDs of sandbox kernels (and what they started): processes under a kernel uid."""
    out = []
    for pid in process_cmdlines():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # gone meanwhile
            continue
        uid = next((int(l.split()[1]) for l in status.splitlines() if l.startswith("Uid:")), 0)
        if uid >= KERNEL_UID_FLOOR:
            out.append(pid)
    return out


def sandbox_replicas() -> list[int]:
    return [pid for pid, cmd in process_cmdlines().items() if cmd.startswith("ray::ServeReplica:tools:PythonSandbox")]


def test_a_killed_sandbox_replica_costs_error_turns_not_episodes(tmp_path, tiny_policy_dir):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", "--config", "deploy/configs/tiny-deepeyesv2.yaml",
           f"trainer.run_dir={run_dir}", f"model.cache_dir={tiny_policy_dir.parent}", *SHAPE, "trainer.steps=3"]
    proc, lines = start_until(cmd, "step 1/3")
    victims = sandbox_replicas()
    assert len(victims) == 1, "".join(lines)[-3000:]
    # mid-episode: wait until a kernel is bound to an episode (more kernels than the one warm spare)
    deadline = time.monotonic() + 300
    while len(kernels()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert len(kernels()) >= 2, "no episode of step 2 started a kernel"
    os.kill(victims[0], signal.SIGKILL)
    rest, _ = proc.communicate(timeout=600)
    log = "".join(lines) + rest
    (tmp_path / "job.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]

    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in rows if "reward/score" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["rollout/episodes"] for r in train] == [4.0] * 3 and all(r["rollout/failed_episodes"] == 0 for r in train)
    saved = [json.loads(l) for f in sorted((run_dir / "trajectories").glob("step_*.jsonl"))
             for l in f.read_text().splitlines()]
    python_calls = [c for t in saved if t["version"] >= 2 for c in t["tool_calls"] if c["name"] == "python"]
    hit = [c for c in python_calls if c["status"] == "lost" or "state was lost" in c["text"]]
    assert hit, [c["text"][:120] for c in python_calls]  # the kill reached episodes: an error turn, said so
    assert sandbox_replicas() == [] and kernels() == []  # nothing outlives the run
