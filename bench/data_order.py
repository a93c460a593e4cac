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

    python -m bench.data_order [--file PATH] [--rows 1000]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.data import DEFAULT_CACHE, write_rows  # the same generator as the scale benchmark
from bench.runner import local_cluster, print_headline, print_table
from deepeyes.config import DataConfig
from deepeyes.data import ParquetRows, RowStream


def ray_data_pass(path: str, seed: int, stop_at: int | None = None) -> tuple[list[str], float, float]:
    """Row ids in Ray Data's order; (ids, seconds to the first batch, seconds in all)."""
    import ray.data  # heavy: Ray Data only inside the cluster this script starts

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


def ray_data_order(path: str) -> dict:
    """Two full Ray Data passes with one seed and one up to the middle (what a resume would read)."""
    with local_cluster(2):
        import ray.data  # heavy: Ray Data only inside the cluster

        ray.data.DataContext.get_current().execution_options.preserve_order = True
        a, a_first, a_all = ray_data_pass(path, seed=3)
        b, _, _ = ray_data_pass(path, seed=3)
        _, _, to_half = ray_data_pass(path, seed=3, stop_at=len(a) // 2)
    return {"ids": a, "again": b, "first_s": a_first, "all_s": a_all, "to_half_s": to_half}


def row_stream_order(path: str, half: int) -> dict:
    """RowStream on the same file: two full passes with one seed, and a resume at `half`."""
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
    return {"ids": full, "again": again, "first_s": rs_first, "resume_s": time.perf_counter() - t,
            "resume_exact": rest == full[half:], "groups_read": len(set(reads)), "groups": len(src3.groups)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="", help="a DeepEyes-schema parquet (default: bench.data's 1k-row file)")
    ap.add_argument("--rows", type=int, default=1000, help="rows of the generated file when --file is not given")
    args = ap.parse_args()
    path = args.file or str(write_rows(Path(DEFAULT_CACHE) / f"rows_{args.rows}.parquet", args.rows))
    rd = ray_data_order(path)
    a = rd["ids"]
    rs = row_stream_order(path, len(a) // 2)
    same_ray, same_rs = a == rd["again"], rs["ids"] == rs["again"]
    print_table([("", "<44"), ("Ray Data", ">12.2f"), ("RowStream", ">12.2f")], [
        ("same order on two passes, one seed", str(same_ray), str(same_rs)),
        ("rows in one epoch", str(len(a)), str(len(rs["ids"]))),
        ("seconds to the first 16 rows", rd["first_s"], rs["first_s"]),
        ("seconds for the whole epoch", rd["all_s"], ""),
        ("resume at the middle: seconds to get there", rd["to_half_s"], 0.0),
        ("resume at the middle: rest of the epoch s", "", rs["resume_s"])])
    print(f"RowStream resume: {rs['groups_read']} of {rs['groups']} row groups read, continues exactly: "
          f"{rs['resume_exact']}")
    if not same_ray:
        diff = sum(x != y for x, y in zip(a, rd["again"]))
        print(f"Ray Data: {diff} of {len(a)} positions differ between the two passes with seed 3")
    print_headline({"ray_data_same_order": same_ray, "rowstream_same_order": same_rs,
                    "ray_data_first_s": round(rd["first_s"], 2), "rowstream_first_s": round(rs["first_s"], 2),
                    "ray_data_to_middle_s": round(rd["to_half_s"], 2), "rowstream_resume_exact": rs["resume_exact"],
                    "rowstream_resume_groups_read": rs["groups_read"], "row_groups": rs["groups"]})


if __name__ == "__main__":
    main()
