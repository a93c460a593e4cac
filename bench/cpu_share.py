"""Where the CPU goes during steady GRPO steps: CPU seconds per process over a window (issue 13).

Runs the real main job (local Ray, Serve apps, Ray Train, tiny policy) on the issue shape (4
prompts x n=4, one 64-token turn) and, once the first steps are done, reads every process's
utime+stime from /proc before and after a `--window` of seconds. Prints CPU seconds per process
role and the total against the machine's cores x window: when the total reaches the cores, the
rollout engine cannot get the cores it reserved while the other processes run.

    python bench/cpu_share.py [--window 10] [--steps 16]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPE = ["model.warm_start=false", "rollout.n=4", "trainer.batch_size=4", "rollout.max_assistant_turns=1",
         "rollout.max_new_tokens_per_turn=64", "rollout.max_response_length=64"]
ROLES = [("ServeReplica:rollout", "rollout replica"), ("RayTrainWorker", "Train worker"),
         ("ServeReplica:judge", "judge replica"), ("ServeReplica:tools", "tools replica"),
         ("raylet", "raylet"), ("gcs_server", "GCS"), ("ServeController", "Serve controller"),
         ("ProxyActor", "Serve proxy"), ("TrainController", "Train controller"), ("dashboard", "dashboard"),
         ("DashboardAgent", "dashboard")]


def cpu_ticks() -> dict[int, tuple[int, str]]:
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(p.name)] = (int(fields[11]) + int(fields[12]), cmd)  # utime + stime
    return out


def role(cmd: str) -> str:
    for key, name in ROLES:
        if key in cmd:
            return name
    return "driver (this process)" if str(os.getpid()) in cmd or "cpu_share.py" in cmd else "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=float, default=10.0, help="seconds of steady steps to account")
    ap.add_argument("--steps", type=int, default=16, help="GRPO steps (enough to cover warm-up + window)")
    args = ap.parse_args()
    from deepeyes.config import load_config
    from trainer.driver import GRPORecipe

    run_dir = tempfile.mkdtemp(prefix="bench-cpu-")
    cfg = load_config(None, [f"trainer.run_dir={run_dir}", f"trainer.steps={args.steps}", "trainer.save_every=0",
                             "trainer.test_every=0", "data.synthetic_val_rows=0", "logging.progress=false",
                             "logging.plots=false", *SHAPE])
    hz = os.sysconf("SC_CLK_TCK")
    result: dict = {}

    def account() -> None:
        metrics = Path(run_dir) / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:  # past the first steps
            time.sleep(0.2)
        before, t0 = cpu_ticks(), time.perf_counter()
        time.sleep(args.window)
        after, wall = cpu_ticks(), time.perf_counter() - t0
        by_role: collections.Counter[str] = collections.Counter()
        for pid, (ticks, cmd) in after.items():
            if pid in before:
                by_role[role(cmd)] += (ticks - before[pid][0]) / hz
        result.update(wall=wall, by_role=dict(by_role), steps_done=len(metrics.read_text().splitlines()))

    watcher = threading.Thread(target=account, daemon=True)
    recipe = GRPORecipe(cfg)
    try:
        recipe.setup()
        watcher.start()
        recipe.train()
    finally:
        recipe.cleanup()
    watcher.join(timeout=1)
    if not result:
        raise SystemExit("the run ended before the window closed: raise --steps")
    cores = len(os.sched_getaffinity(0))
    total = sum(result["by_role"].values())
    print(f"\nCPU seconds over {result['wall']:.1f} s of steady steps (issue shape), {cores} cores = "
          f"{cores * result['wall']:.1f} CPU-s available")
    print(f"{'process':<24}{'CPU s':>8}{'share':>8}")
    for name, sec in sorted(result["by_role"].items(), key=lambda kv: -kv[1]):
        print(f"{name:<24}{sec:>8.2f}{sec / total:>8.1%}")
    print(f"{'total':<24}{total:>8.2f}{total / (cores * result['wall']):>8.1%} of the machine")
    print(json.dumps({"window_s": round(result["wall"], 1), "cores": cores,
                      "machine_busy": round(total / (cores * result["wall"]), 3),
                      "cpu_s": {k: round(v, 2) for k, v in result["by_role"].items()}}))


if __name__ == "__main__":
    main()
