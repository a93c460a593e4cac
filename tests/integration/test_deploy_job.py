"""Operate deepeyes like a Ray user on two Ray nodes of this machine (two `ray start` processes,
each with a `deepeyes_node` resource and 4 CPUs): `serve deploy deploy/serve-multinode.yaml`,
`ray job submit` of a 2-worker trainer run that uses the running apps, a rescale by re-deploying an
edited YAML while that job runs, Prometheus metrics of the run from both nodes, `ray job stop`.
Rollout and tool replicas (max_replicas_per_node=1) and the two Train workers (2 CPUs each: one
per node at most) must land on both nodes, as the state API reports.

One cluster serves what were two tests (one node: deploy, job, rescale, metrics, stop; two nodes:
the spread), one cluster start, deploy and job fewer in the suite (issue 27): 128 s, where the two
took 234 s and 211 s (those before set-up compiled bytecode, which halved every job's start).
Real CLIs throughout; each node is the test's own and is stopped by pid.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from raycli import (REPO, RayNode, alive_actors, alive_nodes, all_actors, cli, edited_serve_config, free_port,
                    get_json, head_args, replica_counts, serve_status, wait_apps_running, wait_http, worker_args)
from trainer.metrics import prometheus_name

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APPS = ["tools", "judge", "rollout"]
NODE = {"deepeyes_node": 1}
TINY_RUN = ["trainer.steps=2", "trainer.num_workers=2", "trainer.cpus_per_worker=2", "rollout.n=2",
            "trainer.batch_size=2", "trainer.val_rows=2", "model.warm_start=false", "logging.progress=false",
            "logging.plots=false"]
# Ray prefixes application metrics with "ray_"; histograms export _bucket/_sum/_count series.
TRAINER_METRICS = ["reward/score", "reward/acc", "reward/format", "reward/tool", "rollout/num_turns",
                   "rollout/tool_calls", "judge/latency_s", "judge/failures", "timing/rollout_s",
                   "timing/update_s", "timing/step_s", "perf/tokens_per_s"]
SERVICE_METRICS = ["ray_rollout_num_turns_count", "ray_timing_episode_s_count", "ray_judge_cache_hit_rate",
                   "ray_rollout_episodes_total", "ray_rollout_engine_batch_size_count", "ray_rollout_idle_share"]
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(port: int) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text format -> {metric name: [(labels, value)]}."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.setdefault(m.group(1), []).append((m.group(2) or "", float(m.group(3))))
    return out



class Seen:
    """Every series each node's metrics endpoint has shown (a series keeps its last value once it
    leaves the endpoint), merged over the nodes: a replica reports on the node it runs on."""

    def __init__(self, ports: list[int]):
        self.by_port: dict[int, dict[str, list[tuple[str, float]]]] = {p: {} for p in ports}

    def poll(self) -> dict[str, list[tuple[str, float]]]:
        for port, seen in self.by_port.items():
            seen.update(scrape(port))
        return self.merged()

    def merged(self) -> dict[str, list[tuple[str, float]]]:
        out: dict[str, list[tuple[str, float]]] = {}
        for seen in self.by_port.values():
            for name, samples in seen.items():
                out.setdefault(name, []).extend(samples)
        return out

    def now(self) -> dict[str, list[tuple[str, float]]]:
        """One fresh scrape of every node, nothing remembered."""
        out: dict[str, list[tuple[str, float]]] = {}
        for port in self.by_port:
            for name, samples in scrape(port).items():
                out.setdefault(name, []).extend(samples)
        return out


def start_two_nodes(nodes: list[RayNode], tmp_path: Path, temp_dir: str, dash_port: int,
                    metrics_ports: list[int]) -> None:
    """A head and a worker node (4 CPUs and one `deepeyes_node` each), appended to nodes as they
    start (the caller stops them, also when a start fails)."""
    gcs_port = free_port()
    dashboard = f"http://127.0.0.1:{dash_port}"
    # Report custom metrics every second (default 10 s): a 2-step run ends within seconds.
    nodes.append(RayNode(head_args(temp_dir, 4, dash_port, metrics_ports[0], NODE, gcs_port)
                     + ["--node-ip-address=127.0.0.1", '--system-config={"metrics_report_interval_ms": 1000}'],
                     tmp_path / "head.log"))
    wait_http(f"{dashboard}/api/version", 120)

    def worker(k: int) -> RayNode:
        return RayNode(worker_args(f"127.0.0.1:{gcs_port}", 4, NODE, metrics_ports[1]), tmp_path / f"worker{k}.log")

    nodes.append(worker(1))
    deadline, starts = time.time() + 150, 1
    while len(alive_nodes(dashboard)) < 2:
        assert time.time() < deadline, f"the second node did not join ({starts} starts; see {tmp_path}/worker*.log)"
        if nodes[-1].proc.poll() is not None and starts < 3:
            # `ray start` gives up after 30 s without the GCS's node info (seen once on a busy
            # 2-core machine: "Deadline Exceeded"); an operator would start it again, so do we
            nodes[-1].stop()
            starts += 1
            nodes.append(worker(starts))
        time.sleep(2)


def run_job_rescaling_the_judge(dashboard: str, job_id: str, run_dir: Path, scaled: Path,
                                seen: Seen) -> tuple[str, str, float]:
    """Submit the tiny run; while it runs (once it has taken the running apps) re-deploy the edited
    YAML (JudgeService 1 -> 2). (final status, job status at the rescale, time it ended)."""
    cli("ray", "job", "submit", "--address", dashboard, "--submission-id", job_id, "--working-dir", ".",
        "--runtime-env", "deploy/job-runtime-env.yaml", "--no-wait", "--",
        "python", "-m", "trainer", f"trainer.run_dir={run_dir}", *TINY_RUN)
    rescaled_while = ""
    deadline, status = time.time() + 300, "PENDING"
    while time.time() < deadline:
        status = get_json(f"{dashboard}/api/jobs/{job_id}")["status"]
        seen.poll()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status, rescaled_while, time.time()
        if not rescaled_while and "using the running Serve app 'judge'" in \
                get_json(f"{dashboard}/api/jobs/{job_id}/logs")["logs"]:
            cli("serve", "deploy", "-a", dashboard, str(scaled))
            rescaled_while = get_json(f"{dashboard}/api/jobs/{job_id}")["status"]
        time.sleep(1)
    return status, rescaled_while, float("inf")


def check_metrics(seen: Seen, run_dir: Path, train_records: list[dict]) -> None:
    """Every wanted series was exported (from whichever node reports it); the trainer's reward gauge
    holds a value the run wrote to metrics.jsonl (same number, two independent paths)."""
    wanted = [f"ray_{prometheus_name(m)}" for m in TRAINER_METRICS] + SERVICE_METRICS + [
        "ray_deepeyes_async_staleness_count"]
    extra = time.time() + 30  # the exporter may lag the job's last report by a few seconds
    got = seen.poll()
    while time.time() < extra and not all(w in got for w in wanted):
        time.sleep(1)
        got = seen.poll()
    (run_dir / "metrics_seen.json").write_text(json.dumps(got, indent=1))  # for a failing run
    missing = [w for w in wanted if w not in got]
    assert not missing, f"missing {missing}; deepeyes-like series seen: " \
                        f"{sorted(k for k in got if 'deepeyes' in k or 'rollout' in k or 'judge' in k)}"
    exported = [v for _, v in got["ray_deepeyes_reward_score"]]
    assert any(r["reward/score"] == pytest.approx(v) for r in train_records for v in exported)
    # 2 steps x 2 prompts x n=2 episodes, summed over the replicas' series (both nodes)
    assert sum(v for _, v in got["ray_rollout_num_turns_count"]) >= 8
    assert sum(v for _, v in got["ray_rollout_episodes_total"]) >= 8
    assert sum(v for _, v in got["ray_rollout_engine_batch_size_count"]) >= 1  # one per batched forward
    assert all(0.0 <= v <= 1.0 for _, v in got["ray_rollout_idle_share"])
    # the staleness histogram: every episode of both steps observed once (on-policy here: bucket 0)
    episodes = sum(r["rollout/episodes"] for r in train_records)
    until = time.time() + 30  # the count of the last step may still be on its way to the exporter
    while time.time() < until and sum(v for _, v in got["ray_deepeyes_async_staleness_count"]) < episodes:
        time.sleep(1)
        got = seen.poll()
    assert sum(v for _, v in got["ray_deepeyes_async_staleness_count"]) == episodes
    # deploy/grafana/deepeyes.json selects runs by this label
    assert all('SessionName="' in labels for labels, _ in got["ray_deepeyes_reward_score"])


def check_spread(dashboard: str) -> None:
    """Rollout and tool replicas and the Train workers (dead by now: all actors, not alive ones)
    ran on both nodes."""
    actors = all_actors(dashboard)
    node_ids = {n["node_id"] for n in alive_nodes(dashboard)}
    assert len(node_ids) == 2
    for kind in ("RolloutWorker", "ToolService", "RayTrainWorker"):
        where = {a["node_id"] for a in actors if kind in a["class_name"]}
        assert where == node_ids, (kind, where, node_ids, sorted({a["class_name"] for a in actors}))


def check_job_stop(dashboard: str) -> None:
    """`ray job stop` ends a running job."""
    sleeper = f"deepeyes-sleep-{int(time.time())}"
    cli("ray", "job", "submit", "--address", dashboard, "--submission-id", sleeper, "--no-wait", "--",
        "python", "-c", "import time; time.sleep(600)")
    deadline = time.time() + 60
    while get_json(f"{dashboard}/api/jobs/{sleeper}")["status"] != "RUNNING":
        assert time.time() < deadline
        time.sleep(1)
    cli("ray", "job", "stop", "--address", dashboard, sleeper, timeout=120)
    assert get_json(f"{dashboard}/api/jobs/{sleeper}")["status"] == "STOPPED"


def test_two_nodes_serve_deploy_job_submit_spread_metrics_rescale_stop(tmp_path: Path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Unix socket paths live under it
    dash_port, http_port = free_port(), free_port()
    metrics_ports = [free_port(), free_port()]
    dashboard = f"http://127.0.0.1:{dash_port}"
    nodes: list[RayNode] = []
    try:
        start_two_nodes(nodes, tmp_path, temp_dir, dash_port, metrics_ports)

        # SERVE: the three apps from the repository's multi-node YAML (a free HTTP port; both
        # nodes share one loopback here, so only the head runs an HTTP proxy)
        serve_yaml = edited_serve_config(REPO / "deploy/serve-multinode.yaml", tmp_path / "serve.yaml", http_port,
                                         proxy_location="HeadOnly")
        cli("serve", "deploy", "-a", dashboard, str(serve_yaml))
        wait_apps_running(dashboard, APPS, 240)

        def judge_replicas() -> set[str]:
            return {a["actor_id"] for a in alive_actors(dashboard) if "JudgeService" in a["class_name"]}

        first_judges = judge_replicas()
        assert len(first_judges) == 1

        # JOB: a tiny 2-worker trainer run that must use the running apps; the judge rescaled meanwhile
        run_dir = tmp_path / "run"
        scaled = edited_serve_config(REPO / "deploy/serve-multinode.yaml", tmp_path / "serve-2.yaml", http_port,
                                     replicas={"JudgeService": 2}, proxy_location="HeadOnly")
        seen, job_id = Seen(metrics_ports), f"deepeyes-test-{int(time.time())}"
        status, rescaled_while, ended = run_job_rescaling_the_judge(dashboard, job_id, run_dir, scaled, seen)
        logs = cli("ray", "job", "logs", "--address", dashboard, job_id).stdout
        assert status == "SUCCEEDED", logs[-6000:]
        assert rescaled_while == "RUNNING", "the job ended before the rescale: nothing was shown"
        for app in APPS:
            assert f"using the running Serve app '{app}'" in logs
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_records = [r for r in records if "reward/score" in r]
        assert [r["step"] for r in train_records] == [1, 2]

        check_spread(dashboard)
        check_metrics(seen, run_dir, train_records)

        # The rescale took effect, the first judge replica was kept (scaled out, not restarted),
        # and the job left the apps it did not deploy running.
        deadline = time.time() + 180
        while replica_counts(serve_status(dashboard), "judge", "JudgeService") != {"RUNNING": 2}:
            assert time.time() < deadline, serve_status(dashboard)
            time.sleep(2)
        now = judge_replicas()
        assert len(now) == 2 and first_judges <= now
        wait_apps_running(dashboard, APPS, 30)

        check_job_stop(dashboard)
        # GAUGES stay on the endpoint between their events (issue 12 item 12): without the
        # replicas setting them again, both were gone 15-20 s after the job's last step (measured)
        # (checked last, 25 s after the job ended: the rescale and stop checks above fill the wait)
        time.sleep(max(0.0, ended + 25 - time.time()))
        for _ in range(3):
            now_seen = seen.now()
            assert "ray_sync_version" in now_seen and "ray_judge_cache_hit_rate" in now_seen, sorted(now_seen)[:80]
            assert max(v for _, v in now_seen["ray_sync_version"]) >= 1  # the job published version >= 1
            time.sleep(1)
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
