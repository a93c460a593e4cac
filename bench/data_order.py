"""Why the training stream reads parquet row groups itself instead of through Ray Data (issue 14).

The trainer needs an exact order: every worker takes the same rows in the same order, and a
resumed run continues at (epoch, pos) with no prompt skipped or repeated. This script measures,
on one parquet file, side by side:
- Ray Data (`ray.data.read_parquet(...).iter_batches(local_shuffle_buffer_size=B,
  local_shuffle_seed=S)`, preserve_order on): is the order the same on two passes with one seed?
  How long to the first batch, how long to reach the middle of the epoch (a resume has no other
  way than reading through)?
- deepeyes.data.RowStream with the same buffer: the same questions (its order is computed from row
  numbers, so it is exact by construction; checked here anyway), and a resume starts at its
  position at once, reading only the row groups that still hold rows not taken (with a shuffle
  buffer that is most of them while the buffer spans the groups, as in this small file).

    python bench/data_order.py [--file PATH] [--rows 1000]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def ray_data_pass(path: str, seed: int, stop_at: int | None = None) -> tuple[list[str], float, float]:
    """Row ids in Ray Data's order; (ids, seconds to the first batch, seconds in all)."""
    import ray.data

    t = time.perf_counter()
    ds = ray.data.read_parquet(path, columns=["images", "extra_info"])
    ids: list[str] = []
    first = 0.0
    for batch in ds.iter_batches(batch_size=16, batch_format="pyarrow", local_shuffle_buffer_size=256,
                                 local_shuffle_seed=seed):
        if not ids:
            first = time.perf_counter() - t
        ids += [x["index"] for x in batch.column("extra_info").to_pylist()]
        if stop_at is not None and len(ids) >= stop_at:
            break
    return ids, first, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="", help="a DeepEyes-schema parquet (default: bench/data.py's 1k-row file)")
    ap.add_argument("--rows", type=int, default=1000, help="rows of the generated file when --file is not given")
    args = ap.parse_args()
    from bench.data import write_rows  # noqa: E402  (the same generator as the scale benchmark)
    from deepeyes.config import DataConfig
    from deepeyes.data import ParquetRows, RowStream

    path = args.file or str(write_rows(Path(os.environ.get(
        "DEEPEYES_BENCH_CACHE", str(Path.home() / ".cache" / "deepeyes-ray" / "bench-data"))) / f"rows_{args.rows}.parquet",
        args.rows))
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        a, a_first, a_all = ray_data_pass(path, seed=3)
        b, _, _ = ray_data_pass(path, seed=3)
        half = len(a) // 2
        _, _, to_half = ray_data_pass(path, seed=3, stop_at=half)
    finally:
        ray.shutdown()

    src = ParquetRows([path], DataConfig())
    t = time.perf_counter()
    s = RowStream(src, seed=3, buffer_rows=256)
    first_rows = s.take(16)
    rs_first = time.perf_counter() - t
    full = [r.index for r in first_rows] + [r.index for r in s.take(len(src) - 16)]
    s2 = RowStream(ParquetRows([path], DataConfig()), seed=3, buffer_rows=256)
    again = [r.index for r in s2.take(len(src))]
    reads = []
    src3 = ParquetRows([path], DataConfig())
    real = src3.read_group
    src3.read_group = lambda gi: reads.append(gi) or real(gi)  # count the row groups a resume reads
    t = time.perf_counter()
    resumed = RowStream(src3, seed=3, buffer_rows=256, epoch=0, pos=half)
    rest = [r.index for r in resumed.take(len(src3) - half)]
    resume_s = time.perf_counter() - t

    same_ray = a == b
    print(f"{'':<44}{'Ray Data':>12}{'RowStream':>12}")
    print(f"{'same order on two passes, one seed':<44}{str(same_ray):>12}{str(full == again):>12}")
    print(f"{'rows in one epoch':<44}{len(a):>12}{len(full):>12}")
    print(f"{'seconds to the first 16 rows':<44}{a_first:>12.2f}{rs_first:>12.2f}")
    print(f"{'seconds for the whole epoch':<44}{a_all:>12.2f}{'':>12}")
    print(f"{'resume at the middle: seconds to get there':<44}{to_half:>12.2f}{0.0:>12.2f}")
    print(f"{'resume at the middle: rest of the epoch s':<44}{'':>12}{resume_s:>12.2f}")
    print(f"RowStream resume: {len(set(reads))} of {len(src3.groups)} row groups read, continues exactly: "
          f"{rest == full[half:]}")
    if not same_ray:
        diff = sum(x != y for x, y in zip(a, b))
        print(f"Ray Data: {diff} of {len(a)} positions differ between the two passes with seed 3")
    print(json.dumps({"ray_data_same_order": same_ray, "rowstream_same_order": full == again,
                      "ray_data_first_s": round(a_first, 2), "rowstream_first_s": round(rs_first, 2),
                      "ray_data_to_middle_s": round(to_half, 2), "rowstream_resume_exact": rest == full[half:],
                      "rowstream_resume_groups_read": len(set(reads)), "row_groups": len(src3.groups)}))


if __name__ == "__main__":
    main()
