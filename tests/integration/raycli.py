"""A Ray cluster of the test's own, driven through the real `ray` / `serve` CLIs of the venv.

Used by the deploy tests: each node is a `ray start --block` process in its own session, and
stopping it ends exactly that process tree by pid (never `ray stop`, which would end every Ray
process on the machine, other people's clusters included).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    """The environment of every CLI call: venv first on PATH (so `python` in a job entrypoint is
    the venv's), no inherited RAY_ADDRESS, Train's fast poll, token authentication on."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.update(TOKENIZERS_PARALLELISM="false", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
               RAY_USAGE_STATS_ENABLED="0",
               # `ray start --head` turns token auth on by default, but `serve deploy` with the
               # mode unset sends no token (401): say it explicitly, as docs/operations.md does.
               RAY_AUTH_MODE="token")
    return env


def cli(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ray ...` / `serve ...` from the venv; on failure the message carries its output."""
    cmd = [str(VENV_BIN / args[0]), *args[1:]]
    out = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def _children(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


class RayNode:
    """One `ray start --block` process (head or worker) and everything it spawned."""

    def __init__(self, args: list[str], log_path: Path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                                     cwd=REPO, env=cli_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the tree, then SIGKILL what is left of it. A process is identified by (pid, start
        time), so a pid the kernel hands to someone else meanwhile is never signalled."""
        procs = {p: _start_time(p) for p in [self.proc.pid, *_children(self.proc.pid)]}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p, started in procs.items():
                if started is not None and _start_time(p) == started:
                    try:
                        os.kill(p, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.time() + grace_s
            while time.time() < deadline and any(_start_time(p) == t and _alive(p) for p, t in procs.items()):
                time.sleep(0.3)
            self.proc.poll()
        self.log.close()


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def head_args(temp_dir: str, num_cpus: float, dashboard_port: int, metrics_port: int,
              resources: dict[str, float] | None = None, gcs_port: int | None = None) -> list[str]:
    """`ray start --head` arguments with every fixed port of a default head replaced by a free one."""
    args = ["--head", f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp_dir}", f"--port={gcs_port or free_port()}", f"--dashboard-port={dashboard_port}",
            f"--metrics-export-port={metrics_port}", f"--ray-client-server-port={free_port()}",
            "--object-store-memory=500000000", *node_ports()]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    return args


def worker_args(gcs_address: str, num_cpus: float, resources: dict[str, float] | None = None,
                metrics_port: int | None = None) -> list[str]:
    """`ray start` arguments of one more node on this machine (its own free ports)."""
    args = [f"--address={gcs_address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            f"--metrics-export-port={metrics_port or free_port()}", "--object-store-memory=300000000",
            *node_ports()]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    return args


def node_ports() -> list[str]:
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}"]


def auth_headers() -> dict[str, str]:
    """Ray 2.60 turns on token authentication by default: the dashboard answers 401 without the
    token the CLIs read from RAY_AUTH_TOKEN or the file at RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if not token and path.exists():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get(url: str, timeout: float) -> Any:
    return urllib.request.urlopen(urllib.request.Request(url, headers=auth_headers()), timeout=timeout)


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            with _get(url, 2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise AssertionError(f"{url} did not answer within {timeout_s} s")
        time.sleep(0.5)


def get_json(url: str) -> Any:
    with _get(url, 10) as r:
        return json.loads(r.read())


def serve_status(dashboard: str) -> dict[str, Any]:
    """`serve status` parsed (its output is YAML)."""
    return yaml.safe_load(cli("serve", "status", "-a", dashboard, timeout=60).stdout) or {}


def replica_counts(status: dict[str, Any], app: str, deployment: str) -> dict[str, int]:
    apps = status.get("applications") or {}
    dep = ((apps.get(app) or {}).get("deployments") or {}).get(deployment) or {}
    return dep.get("replica_states") or {}


def wait_apps_running(dashboard: str, apps: list[str], timeout_s: float) -> dict[str, Any]:
    deadline = time.time() + timeout_s
    while True:
        status = serve_status(dashboard)
        states = {a: (status.get("applications") or {}).get(a, {}).get("status") for a in apps}
        if all(s == "RUNNING" for s in states.values()):
            return status
        if any(s == "DEPLOY_FAILED" for s in states.values()) or time.time() > deadline:
            raise AssertionError(f"apps not RUNNING: {states}\n{yaml.safe_dump(status)[-4000:]}")
        time.sleep(2)


def edited_serve_config(src: Path, dst: Path, http_port: int, replicas: dict[str, int] | None = None,
                        proxy_location: str | None = None) -> Path:
    """A copy of a Serve YAML on another HTTP port, with some deployments' num_replicas changed."""
    cfg = yaml.safe_load(src.read_text())
    cfg["http_options"]["port"] = http_port
    if proxy_location:
        cfg["proxy_location"] = proxy_location
    for app in cfg["applications"]:
        for dep in app.get("deployments", []):
            if replicas and dep["name"] in replicas:
                dep["num_replicas"] = replicas[dep["name"]]
    dst.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def alive_actors(dashboard: str) -> list[dict[str, Any]]:
    """`ray list actors` (state API through the CLI): alive actors with class_name and node_id."""
    out = cli("ray", "list", "actors", "--address", dashboard, "--filter", "state=ALIVE", "--format", "json",
              "--limit", "1000", timeout=60)
    return json.loads(out.stdout)


def all_actors(dashboard: str) -> list[dict[str, Any]]:
    """Every actor the cluster has known, dead ones included (they keep their node_id)."""
    out = cli("ray", "list", "actors", "--address", dashboard, "--format", "json", "--limit", "10000", timeout=60)
    return json.loads(out.stdout)


def alive_nodes(dashboard: str) -> list[dict[str, Any]]:
    out = cli("ray", "list", "nodes", "--address", dashboard, "--filter", "state=ALIVE", "--format", "json",
              timeout=60, check=False)
    return _json_list(out.stdout)


def _json_list(text: str) -> list[dict[str, Any]]:
    """The JSON list in a `ray list --format json` output; [] while the state API is not ready
    (it then prints a warning or nothing instead)."""
    try:
        return json.loads(text[text.index("["):])
    except ValueError:
        return []


def wait_job(dashboard: str, job_id: str, timeout_s: float) -> str:
    deadline = time.time() + timeout_s
    while True:
        status = get_json(f"{dashboard}/api/jobs/{job_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.time() > deadline:
            return status
        time.sleep(2)
