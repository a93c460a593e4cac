"""What a killed Ray Train worker costs a run: the chaos test's job (tiny-cpu, 5 steps, checkpoint
every 2, one restart allowed) run twice, side by side: once clean, once with a Train worker
SIGKILLed when the driver shows step 3. Prints a table and one JSON line.

    python bench/fault_cost.py
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "chaos")]

from deepeyes.config import DEFAULT_CACHE_DIR  # noqa: E402
from test_faults import job, start_until, train_workers  # noqa: E402


def run(kill: bool) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="fault-cost-")) / "run"
    cmd = job(run_dir, os.path.expanduser(DEFAULT_CACHE_DIR), "trainer.steps=5", "trainer.save_every=2",
              "trainer.max_failures=1")
    t0 = time.perf_counter()
    proc, _ = start_until(cmd, "step 3/5")
    t_mark = time.perf_counter()
    if kill:
        os.kill(train_workers()[-1], signal.SIGKILL)
    proc.communicate(timeout=900)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "after_step3_s": time.perf_counter() - t_mark}


def main() -> None:
    clean, killed = run(kill=False), run(kill=True)
    print(f"{'run':<24}{'rc':>4}{'wall s':>9}{'after step 3 s':>16}")
    for name, r in (("clean", clean), ("Train worker killed", killed)):
        print(f"{name:<24}{r['rc']:>4}{r['wall_s']:>9.1f}{r['after_step3_s']:>16.1f}")
    cost = killed["after_step3_s"] - clean["after_step3_s"]
    print(f"a killed Train worker costs {cost:.1f} s (restart, checkpoint reload, the lost step again)")
    print(json.dumps({"kill_cost_s": round(cost, 1), "clean_rc": clean["rc"], "killed_rc": killed["rc"]}))


if __name__ == "__main__":
    main()
