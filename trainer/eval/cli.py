"""python -m trainer eval: a policy on V* Bench, HR-Bench and the synthetic set, with and without
the zoom tool, under the fair protocol (shuffled options, k samples, rule matcher first).

  python -m trainer eval [--model DIR] [--vstar DIR|JSONL]... [--hrbench TSV]... [--synthetic N|PARQUET]
                         [--twins] [--k 4] [--temperature 0] [--out DIR] [key=value ...]

Benchmarks come from trainer/eval/benchmarks/ (one module each; adding one adds its flag).

With no benchmark named, the synthetic set (16 V*-like rows written into the out folder) is run.
--model: a model folder (a checkpoint's HF export, RUN/train/step_N/hf, or any Qwen2.5-VL folder);
default: the config's model (tiny: the embedded tiny policy after its cached warm start).
Writes OUT/eval.json (headline figures per benchmark and mode, and the config), OUT/items.jsonl
(one line per episode: item, seed, options order, answer, correctness, who scored it, tool calls,
boxes), OUT/plots/<benchmark>.png (Avg@k per category, with vs without the tool), OUT/images/ (small
JPEG thumbnails of the item frames and crops, --images-kb in all) and prints the table;
`python -m trainer view OUT` shows it all in a web page.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from deepeyes.config import ConfigError, load_config
from trainer.eval.benchmarks import registry
from trainer.eval.records import IMAGE_KB


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m trainer eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="policy folder (HF format); default: the config's model.path")
    ap.add_argument("--config", help="scenario YAML (default: deploy/configs/tiny-cpu.yaml)")
    for b in registry():
        ap.add_argument(f"--{b.name}", action="append", default=[], help=b.help)
    ap.add_argument("--twins", action="store_true",
                    help="write small twins of " + ", ".join(b.name for b in registry() if b.twin) +
                         " (trainer/eval/twins.py) into OUT/twins and run them")
    ap.add_argument("--twin-items", type=int, default=6, help="items per twin benchmark (default: 6)")
    ap.add_argument("--limit", type=int, default=0, help="items per benchmark at most (0 = all)")
    ap.add_argument("--k", type=int, default=4, help="samples per item, each with its own option order (default: 4)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy (default; the k samples then differ by option order only), else sampled")
    ap.add_argument("--seed", type=int, default=0, help="protocol seed: option orders and sampling seeds")
    ap.add_argument("--modes", default="tool,no_tool",
                    help="comma list of tool (zoom available) and no_tool (the ablation); default: both")
    ap.add_argument("--no-shuffle", action="store_true",
                    help="keep the file's option order (the biased original protocol; for comparison only)")
    ap.add_argument("--no-map-crops", action="store_true",
                    help="crop the model frame as training does, not the original at the mapped box")
    ap.add_argument("--chunk-items", type=int, default=8, help="items in flight at once (memory bound)")
    ap.add_argument("--images-kb", type=int, default=IMAGE_KB,
                    help="KiB of JPEG thumbnails (item frames, then crops) kept in OUT/images for "
                         f"`python -m trainer view`, over the whole run; 0 = none (default: {IMAGE_KB})")
    ap.add_argument("--out", default="", help="output folder (default: runs/eval-<time>)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rollout.max_new_tokens_per_turn=64")
    return ap.parse_intermixed_args(argv)


def benchmarks(args: argparse.Namespace, cfg: Any, out: Path) -> list[tuple[str, Any]]:
    """(name, a callable giving a fresh item iterator) per benchmark source asked for."""
    from trainer.eval.items import limit  # start-up: --help and argument errors stay light

    benches = registry()
    sources = {b.name: list(getattr(args, b.name)) for b in benches}  # argparse sets one list per flag
    if args.twins:
        for b in benches:
            if b.twin is not None:
                sources[b.name].append(b.twin(out / "twins", args.twin_items, args.seed))
    if not any(sources.values()):
        sources = {b.name: [b.default_source] if b.default_source else [] for b in benches}
    found: list[tuple[str, Any]] = []
    names: dict[str, int] = {}
    for b in benches:
        for source in sources[b.name]:
            source = b.prepare(source, out, cfg) if b.prepare else source
            base = b.result_name(source) if b.result_name else b.name
            names[base] = names.get(base, 0) + 1
            name = base if names[base] == 1 else f"{base}_{names[base]}"
            found.append((name, lambda b=b, source=source, name=name: limit(b.read(source, name, cfg), args.limit)))
    return found


def check_files(found: list[tuple[str, Any]]) -> None:
    """Read every benchmark once before the cluster starts: a malformed file fails in seconds."""
    for _, items in found:
        for _ in items():
            pass


def run(args: argparse.Namespace) -> int:
    from trainer.eval.harness import EvalCluster, EvalPlan, run_items, table  # torch, Ray: after --help
    from trainer.eval.records import ItemsWriter, write_json
    from trainer.eval.protocol import MODES, summarize

    out = Path(args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or args.k < 1:
        print(f"eval: --modes takes {', '.join(MODES)} and --k >= 1 (got {args.modes!r}, {args.k})", file=sys.stderr)
        return 2
    overrides = list(args.overrides) + ["rollout.reward=never", f"trainer.run_dir={out}"]
    if args.model:
        overrides.append(f"model.path={Path(args.model).expanduser().resolve()}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    found = benchmarks(args, cfg, out)
    try:
        check_files(found)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2

    from trainer.cluster import exit_on_sigterm  # start-up: --help and argument errors stay light

    exit_on_sigterm()
    from deepeyes.policy_family import frame_factor, zoom_box_scale  # imports torch: kept out of --help

    cluster = EvalCluster(cfg, out)
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    try:
        handle, judge = cluster.start()
        greedy = args.temperature <= 0
        with ItemsWriter(out, args.images_kb) as write:
            for bench, items in found:
                tb = time.perf_counter()
                plan = EvalPlan(k=args.k, modes=modes, seed=args.seed, greedy=greedy,
                                temperature=None if greedy else args.temperature, map_crops=not args.no_map_crops,
                                min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels,
                                factor=frame_factor(cfg.model), box_scale=zoom_box_scale(cfg),
                                shuffle=not args.no_shuffle, chunk_items=args.chunk_items, tag=bench)
                outcomes = run_items(handle, judge, items(), plan, on_record=write)
                write.flush()
                results[bench] = {m: summarize([o for o in outcomes if o.mode == m], args.k) for m in modes}
                for m in modes:
                    results[bench][m]["wall_s"] = round(time.perf_counter() - tb, 1)
    finally:
        cluster.stop()
    from trainer.plots import render_eval_bars  # start-up: --help and argument errors stay light

    summary = {"model": str(cluster.policy_dir or cfg.model.path),
               "protocol": {"k": args.k, "seed": args.seed, "greedy": args.temperature <= 0,
                            "temperature": args.temperature, "shuffle": not args.no_shuffle,
                            "map_crops": not args.no_map_crops, "modes": modes, "limit": args.limit,
                            "judge": cfg.judge.backend, "matcher": "rule first (option letter or text), "
                                                                   "judge for answers naming no option"},
               "benchmarks": results, "wall_s": round(time.perf_counter() - t0, 1),
               "startup_s": round(cluster.startup_s, 1),
               "config": {"rollout": {k: getattr(cfg.rollout, k) for k in (
                   "max_assistant_turns", "max_response_length", "max_new_tokens_per_turn", "engine")},
                   "model": {"min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels},
                   "tools": {"min_side_policy": cfg.tools.min_side_policy}}}
    summary["plots"] = [str(p) for p in render_eval_bars(results, out / "plots")]
    write_json(out / "eval.json", summary)
    print(table(results))
    print(f"eval: {out}/eval.json, items.jsonl, plots/ ({summary['wall_s']} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run(args)
