"""Data at scale: start-up and memory of the main job as the training set grows (issue 14).

Writes DeepEyes-schema parquet of 1k, 5k and 20k rows with realistic images (JPEG, 1-4
megapixels: the synthetic V* scenes, a pool of distinct images reused across rows with their own
questions and ids, row groups of 64 rows) once into a cache folder (not the repo), then runs the
real main job (local Ray, Serve apps, Ray Train, tiny policy) for `--steps` steps on each and
measures, side by side in one run:
- time from the command to the first rollout request (the run's startup.json);
- peak RSS (VmHWM) of the driver, of each Train worker and of the rollout replica, sampled
  every 0.25 s while the job runs.
Targets: peak RSS at 20k rows <= 1.2x that at 1k; time to first request at 20k <= 1.5x that at 1k.

    python -m bench.data [--sizes 1000,5000,20000] [--steps 10] [--cache DIR]

Ends with one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from bench.runner import REPO_ROOT, after_first, job_config, print_headline, print_table, process_cmdlines, run_job
from deepeyes.data import IMAGE_MARKER, SYNTHETIC_SCHEMA, vstar_scene

POOL = 48          # distinct images; rows cycle through them
ROW_GROUP = 64     # rows per parquet row group
SHAPE = ["model.warm_start=false", "rollout.n=4", "trainer.batch_size=4", "rollout.max_assistant_turns=1",
         "rollout.max_new_tokens_per_turn=32", "rollout.max_response_length=64"]
# where the generated parquet goes (also bench.data_order's default file)
DEFAULT_CACHE = os.environ.get("DEEPEYES_BENCH_CACHE", str(Path.home() / ".cache" / "deepeyes-ray" / "bench-data"))


def _jpeg_pool(seed: int) -> list[tuple[bytes, dict]]:
    """POOL V* scenes (1024-2048 px a side, so 1-4 megapixels) as JPEG, with their questions."""
    out = []
    for i in range(POOL):
        made = vstar_scene(np.random.default_rng([seed, i]))
        buf = io.BytesIO()
        made["image"].convert("RGB").save(buf, format="JPEG", quality=90)
        out.append((buf.getvalue(), made))
    return out


def write_rows(path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` DeepEyes-schema rows in row groups of ROW_GROUP, written group by group."""
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    pool = _jpeg_pool(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, SYNTHETIC_SCHEMA, compression="snappy") as writer, \
            tqdm(total=rows, desc=f"writing {path.name}", unit="row") as bar:
        for start in range(0, rows, ROW_GROUP):
            rec: dict[str, list] = {name: [] for name in SYNTHETIC_SCHEMA.names}
            for i in range(start, min(rows, start + ROW_GROUP)):
                data, made = pool[i % POOL]
                index = f"bench-{i}"
                rec["data_source"].append("vstar")
                rec["prompt"].append([{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": f"{IMAGE_MARKER}\n{made['question']}"}])
                rec["images"].append([{"bytes": data, "path": f"{index}.jpg"}])
                rec["ability"].append(made["ability"])
                rec["env_name"].append(made["env"])
                rec["reward_model"].append({"ground_truth": made["answer"], "style": made["style"]})
                rec["extra_info"].append({"answer": made["answer"], "question": made["question"], "index": index,
                                          "split": "train", "kind": made["kind"],
                                          "target_attribute": made["attribute"], "target_bbox": made["bbox"],
                                          "options": made["options"]})
            writer.write_table(pa.Table.from_pydict(rec, schema=SYNTHETIC_SCHEMA), row_group_size=ROW_GROUP)
            bar.update(len(rec["data_source"]))
    tmp.rename(path)
    return path


def _hwm_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m.group(1)) if m else 0


def _roles() -> dict[int, str]:
    """pid -> role of the job's processes worth watching."""
    out = {}
    for pid, cmd in process_cmdlines().items():
        if "ray::RayTrainWorker" in cmd:
            out[pid] = "train_worker"
        elif "ServeReplica:rollout" in cmd:
            out[pid] = "rollout_replica"
    return out


class PeakWatcher(threading.Thread):
    """Peak RSS per process of each role, sampled until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, tuple[str, int]] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for pid, role in _roles().items():
                kb = _hwm_kb(pid)
                if kb:
                    self.peaks[pid] = (role, max(kb, self.peaks.get(pid, (role, 0))[1]))
            self.halt.wait(0.25)

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {"driver": _hwm_kb(os.getpid()) / 1024}
        for role, kb in self.peaks.values():
            out[role] = max(out.get(role, 0.0), kb / 1024)
        return out


def run_size(files: list[str], steps: int) -> dict:
    """A fresh job process on `files`: its start-up and peak RSS per role (the driver's own VmHWM
    only means something in a fresh process, so each size runs as its own child)."""
    run_dir = tempfile.mkdtemp(prefix="bench-data-")
    code = (f"import json; from bench.data import run_child; "
            f"print('RESULT', json.dumps(run_child({files!r}, {steps}, {run_dir!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"job on {files} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT "):])


def run_child(files: list[str], steps: int, run_dir: str) -> dict:
    """The job on `files` in this (fresh) process, its peak RSS per role sampled while it runs."""
    cfg = job_config(run_dir, steps, [f"data.train_files={json.dumps(files)}", *SHAPE], synthetic_val_rows=True)
    watcher = PeakWatcher()
    peaks: dict[str, float] = {}

    def stop_watching() -> None:
        watcher.halt.set()
        watcher.join()
        peaks.update(watcher.by_role())

    watcher.start()
    run = run_job(cfg, before_cleanup=stop_watching)
    rows = run.step_rows()
    return {"first_request_s": run.startup()["first_request_s"], "data_s": run.recipe.timings["data_s"],
            "steps": len(rows), "step_s": float(np.median([r["timing/step_s"] for r in after_first(rows)])),
            "peak_mb": peaks}


def print_results(results: dict[int, dict], sizes: list[int], cache: str) -> None:
    roles = ["driver", "train_worker", "rollout_replica"]
    print()
    print_table([("rows", ">7"), ("parquet GiB", ">13.2f"), ("first request s", ">17.1f"), ("data check s", ">14.2f"),
                 ("step s", ">8.2f"), *((f"peak MB {role}", ">24.0f") for role in roles)],
                [(n, (Path(cache) / f"rows_{n}.parquet").stat().st_size / 2**30, results[n]["first_request_s"],
                  results[n]["data_s"], results[n]["step_s"], *(results[n]["peak_mb"].get(role, 0) for role in roles))
                 for n in sizes])
    lo, hi = results[sizes[0]], results[sizes[-1]]
    rss_ratio = {role: hi["peak_mb"].get(role, 0) / max(lo["peak_mb"].get(role, 1), 1) for role in roles}
    start_ratio = hi["first_request_s"] / lo["first_request_s"]
    print(f"\n{sizes[-1]} vs {sizes[0]} rows: peak RSS " + ", ".join(f"{k} {v:.2f}x" for k, v in rss_ratio.items())
          + f" (target <= 1.2x); time to first request {start_ratio:.2f}x (target <= 1.5x)")
    print_headline({"sizes": sizes, "rss_ratio": {k: round(v, 3) for k, v in rss_ratio.items()},
                    "first_request_ratio": round(start_ratio, 3),
                    "first_request_s": {n: round(results[n]["first_request_s"], 1) for n in sizes},
                    "peak_mb": {n: {k: round(v) for k, v in results[n]["peak_mb"].items()} for n in sizes}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000,20000", help="rows per training set, comma-separated")
    ap.add_argument("--steps", type=int, default=10, help="GRPO steps per size")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="folder for the generated parquet (reused when present)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for n in sizes:
        path = write_rows(Path(args.cache) / f"rows_{n}.parquet", n)
        print(f"{n} rows: {path.stat().st_size / 2**30:.2f} GiB of parquet; running {args.steps} steps", flush=True)
        results[n] = run_size([str(path)], args.steps)
        print(f"  {json.dumps(results[n])}", flush=True)
    print_results(results, sizes, args.cache)


if __name__ == "__main__":
    main()
