"""`python -m deepeyes build-tiny [--out DIR] [--family F]`: build (or find) the embedded tiny policy
(Qwen2.5-VL by default; Qwen3-VL dense or MoE with --family)."""

from __future__ import annotations

import argparse
import time

from deepeyes.config import load_config
from deepeyes.policy import build_tiny_policy, resolve_policy_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m deepeyes", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-tiny", help="build the tiny policy folder (random init, offline)")
    b.add_argument("--out", help="write here instead of the cache folder of the tiny-cpu config")
    b.add_argument("--seed", type=int, default=0, help="random-init seed (same seed, same bytes)")
    b.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"],
                   help="policy family of the tiny twin (default: the embedded Qwen2.5-VL)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.out:
        cfg = load_config().model
        path = build_tiny_policy(args.out, seed=args.seed, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                 vision=cfg.tiny_vision, family=args.family)
    else:
        cfg = load_config(overrides=[f"model.seed={args.seed}", f"model.family={args.family}"]).model
        path = resolve_policy_path(cfg)
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"tiny policy at {path} ({size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
