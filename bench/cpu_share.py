"""Where the CPU goes during steady GRPO steps: CPU seconds per process over a window (issue 13).

Runs the real main job (local Ray, Serve apps, Ray Train, tiny policy) on the issue shape (4
prompts x n=4, one 64-token turn) and, once the first steps are done, reads every process's
utime+stime from /proc before and after a `--window` of seconds. Prints CPU seconds per process
role and the total against the machine's cores x window: when the total reaches the cores, the
rollout engine cannot get the cores it reserved while the other processes run.

    python -m bench.cpu_share [--window 10] [--steps 16]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import threading
import time
from pathlib import Path

from bench.runner import ISSUE_SHAPE, job_config, print_headline, print_table, process_cmdlines, run_job

ROLES = [("ServeReplica:rollout", "rollout replica"), ("RayTrainWorker", "Train worker"),
         ("ServeReplica:judge", "judge replica"), ("ServeReplica:tools", "tools replica"),
         ("raylet", "raylet"), ("gcs_server", "GCS"), ("ServeController", "Serve controller"),
         ("ProxyActor", "Serve proxy"), ("TrainController", "Train controller"), ("dashboard", "dashboard"),
         ("DashboardAgent", "dashboard")]


def cpu_ticks() -> dict[int, tuple[int, str]]:
    """pid -> (utime + stime in clock ticks, command line) of every live process."""
    out = {}
    for pid, cmd in process_cmdlines().items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12]), cmd)  # utime + stime
    return out


def role(cmd: str) -> str:
    for key, name in ROLES:
        if key in cmd:
            return name
    return "driver (this process)" if str(os.getpid()) in cmd or "cpu_share" in cmd else "other"


def account(run_dir: str, window: float, result: dict) -> None:
    """Once the run is past its first steps, CPU seconds per role over `window` seconds into result."""
    hz = os.sysconf("SC_CLK_TCK")
    metrics = Path(run_dir) / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:  # past the first steps
        time.sleep(0.2)
    before, t0 = cpu_ticks(), time.perf_counter()
    time.sleep(window)
    after, wall = cpu_ticks(), time.perf_counter() - t0
    by_role: collections.Counter[str] = collections.Counter()
    for pid, (ticks, cmd) in after.items():
        if pid in before:
            by_role[role(cmd)] += (ticks - before[pid][0]) / hz
    result.update(wall=wall, by_role=dict(by_role), steps_done=len(metrics.read_text().splitlines()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=float, default=10.0, help="seconds of steady steps to account")
    ap.add_argument("--steps", type=int, default=16, help="GRPO steps (enough to cover warm-up + window)")
    args = ap.parse_args()
    run_dir = tempfile.mkdtemp(prefix="bench-cpu-")
    result: dict = {}
    watcher = threading.Thread(target=account, args=(run_dir, args.window, result), daemon=True)
    run_job(job_config(run_dir, args.steps, ISSUE_SHAPE), after_setup=watcher.start)
    watcher.join(timeout=1)
    if not result:
        raise SystemExit("the run ended before the window closed: raise --steps")
    cores = len(os.sched_getaffinity(0))
    total = sum(result["by_role"].values())
    print(f"\nCPU seconds over {result['wall']:.1f} s of steady steps (issue shape), {cores} cores = "
          f"{cores * result['wall']:.1f} CPU-s available")
    print_table([("process", "<24"), ("CPU s", ">8.2f"), ("share", ">8.1%")],
                [(name, sec, sec / total) for name, sec in sorted(result["by_role"].items(), key=lambda kv: -kv[1])])
    print(f"{'total':<24}{total:>8.2f}{total / (cores * result['wall']):>8.1%} of the machine")
    print_headline({"window_s": round(result["wall"], 1), "cores": cores,
                    "machine_busy": round(total / (cores * result["wall"]), 3),
                    "cpu_s": {k: round(v, 2) for k, v in result["by_role"].items()}})


if __name__ == "__main__":
    main()
