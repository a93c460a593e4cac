"""What a killed Ray Train worker costs a run: the chaos test's job (tiny-cpu, 5 steps, checkpoint
every 2, one restart allowed) run twice, side by side: once clean, once with a Train worker
SIGKILLed when the driver shows step 3. Prints a table and one JSON line.

    python -m bench.fault_cost
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

from bench.runner import print_headline, print_table, start_until, train_worker_pids, trainer_command
from deepeyes.config import DEFAULT_CACHE_DIR


def run(kill: bool) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="fault-cost-")) / "run"
    cmd = trainer_command(run_dir, os.path.expanduser(DEFAULT_CACHE_DIR), "trainer.steps=5", "trainer.save_every=2",
                          "trainer.max_failures=1")
    t0 = time.perf_counter()
    proc, _ = start_until(cmd, "step 3/5")
    t_mark = time.perf_counter()
    if kill:
        os.kill(train_worker_pids()[-1], signal.SIGKILL)
    proc.communicate(timeout=900)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "after_step3_s": time.perf_counter() - t_mark}


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    clean, killed = run(kill=False), run(kill=True)
    print_table([("run", "<24"), ("rc", ">4"), ("wall s", ">9.1f"), ("after step 3 s", ">16.1f")],
                [(name, r["rc"], r["wall_s"], r["after_step3_s"])
                 for name, r in (("clean", clean), ("Train worker killed", killed))])
    cost = killed["after_step3_s"] - clean["after_step3_s"]
    print(f"a killed Train worker costs {cost:.1f} s (restart, checkpoint reload, the lost step again)")
    print_headline({"kill_cost_s": round(cost, 1), "clean_rc": clean["rc"], "killed_rc": killed["rc"]})


if __name__ == "__main__":
    main()
