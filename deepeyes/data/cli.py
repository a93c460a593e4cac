"""The data CLI (`python -m deepeyes.data`): `synth` writes the synthetic suite, `inspect` reads
parquet files as training would and prints counts, skips and image sizes."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import time

import numpy as np
import pyarrow.parquet as pq

from deepeyes.config import DataConfig
from deepeyes.data.rows import SKIP_REASONS
from deepeyes.data.stream import read_deepeyes
from deepeyes.data.synthetic import SPLIT_CODES, write_synthetic_suite



def _inspect(files: list[str], cfg: DataConfig) -> str:
    ds = read_deepeyes(files, cfg)
    lines = [f"files: {len(files)}", f"rows kept: {len(ds)}"]
    for source, n in sorted(collections.Counter(r.data_source for r in ds).items()):
        lines.append(f"  {source}: {n}")
    for column in ("ability", "env_name"):  # env_name visual_toolbox_v2 marks the tool rows
        counts = collections.Counter(getattr(r, column) or "(empty)" for r in ds)
        lines.append(f"{column}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    lines.append(f"rows skipped: {sum(ds.skipped.values())}")
    for reason, n in sorted(ds.skipped.items()):
        lines.append(f"  {reason}: {n}  ({SKIP_REASONS[reason]})")
    sizes = np.array([s for r in ds for s in r.image_sizes], dtype=np.int64).reshape(-1, 2)
    if len(sizes):
        lines.append(f"images: {len(sizes)}")
        for name, col in (("width", sizes[:, 0]), ("height", sizes[:, 1]), ("pixels", sizes.prod(1))):
            lines.append(f"  {name}: min {col.min()}  median {int(np.median(col))}  max {col.max()}")
        lines.append(f"  short side < {cfg.min_image_side} (upscaled on decode): "
                     f"{int((sizes.min(1) < cfg.min_image_side).sum())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m deepeyes.data",
                                 description="Synthetic DeepEyes-schema data and a checker for parquet files.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the three-file synthetic suite (V*, ThinkLite, Chart) to DIR",
                       description="Write data_0.1.2_visual_toolbox_v2.parquet, data_thinklite_reasoning_acc"
                                   ".parquet and data_v0.8_visual_toolbox_v2.parquet (rows split 75/15/10).")
    s.add_argument("--out", required=True, help="output folder (created)")
    s.add_argument("--rows", type=int, default=64, help="rows over the three files (default 64)")
    s.add_argument("--seed", type=int, default=1234, help="generator seed; same seed, same bytes (default 1234)")
    s.add_argument("--split", choices=list(SPLIT_CODES), default="train",
                   help="split name; different splits give disjoint rows (default train)")
    i = sub.add_parser("inspect", help="read parquet files as training would; print counts, skips, image sizes")
    i.add_argument("files", nargs="+", help="DeepEyes-schema parquet files")
    i.add_argument("--include-chart", action="store_true", help="keep Chart rows (data.include_chart)")
    i.add_argument("--max-image-pixels", type=int, default=DataConfig().max_image_pixels,
                   help="pixel cap per image, from the header (data.max_image_pixels)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "synth":
        t0 = time.perf_counter()
        paths = write_synthetic_suite(args.out, args.rows, args.seed, args.split)
        for p in paths:
            print(f"{p}  {pq.ParquetFile(p).metadata.num_rows} rows  {os.path.getsize(p) / 1e6:.2f} MB")
        print(f"{args.rows} rows in {time.perf_counter() - t0:.1f} s")
    else:
        cfg = dataclasses.replace(DataConfig(), include_chart=args.include_chart,
                                  max_image_pixels=args.max_image_pixels)
        print(_inspect(args.files, cfg))
