"""deepeyes-ray GRPO driver.

  python -m trainer [--config deploy/configs/tiny-cpu.yaml] [key=value ...]   run GRPO
  python -m trainer plot RUN_DIR                                             render PNG curves
  python -m trainer view RUN_DIR [--port 8080] [--host 127.0.0.1]            look at its episodes
  python -m trainer eval [--model DIR] [--vstar DIR] [--hrbench TSV] [--twins]  benchmarks, +/- tool
  python -m trainer plan [--config FILE] [--gpu-gib 80]                      GPU memory per Train / rollout GPU
  python -m trainer --dry-run [--config ...] [key=value ...]                 check, say what a run would do
  python -m trainer --help                                                   this text + every knob

The tiny-cpu scenario (tiny Qwen2.5-VL, synthetic data, rule judge, local Ray cluster) is the
default. The same command works under `ray job submit --working-dir . -- python -m trainer ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from deepeyes.config import ConfigError, help_text, load_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        ap = argparse.ArgumentParser(prog="python -m trainer plot", description="render PNG curves of a run")
        ap.add_argument("run_dir", help="run folder (holds metrics.jsonl)")
        args = ap.parse_args(argv[1:])
        from trainer.plots import render_plots  # start-up: --help and the other commands stay light

        for path in render_plots(args.run_dir):
            print(path)
        return 0
    if argv and argv[0] == "eval":
        from trainer.eval.cli import main as eval_main  # start-up: --help and the other commands stay light

        return eval_main(argv[1:])
    if argv and argv[0] == "plan":
        from trainer.plan import main as plan_main  # start-up: --help and the other commands stay light

        return plan_main(argv[1:])
    if argv and argv[0] == "view":
        ap = argparse.ArgumentParser(
            prog="python -m trainer view",
            description="serve a web page of a run folder: per step the reward, accuracy and tool-call "
                        "figures and the saved episodes (image with the requested boxes, crops, each "
                        "turn's text, reward parts, GRPO advantage), filters and a group view; or of an "
                        "evaluation folder (python -m trainer eval --out): per benchmark and mode the "
                        "figures, the chart and each item's samples with and without the tool; reads the "
                        "folder on every request, so a run still being written can be watched")
        ap.add_argument("run_dir", help="run folder (metrics.jsonl, trajectories/) or evaluation folder "
                                        "(eval.json, items.jsonl)")
        ap.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
        ap.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1; no authentication: trusted networks only)")
        args = ap.parse_args(argv[1:])
        from trainer.view.app import serve  # start-up: --help and the other commands stay light

        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            print(f"view: {run_dir} is not a folder: give a run folder (trainer.run_dir of a run)", file=sys.stderr)
            return 2
        if not any((run_dir / name).exists() for name in ("metrics.jsonl", "trajectories", "eval.json", "items.jsonl")):
            print(f"view: {run_dir} has no metrics.jsonl, trajectories/, eval.json or items.jsonl yet: showing it "
                  f"as it fills", file=sys.stderr)
        serve(run_dir, args.host, args.port)
        return 0
    ap = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="configuration keys (set in the YAML or as key=value; the defaults shown "
                                        "are the built-in ones, which a scenario YAML may change):\n" + help_text())
    ap.add_argument("--config", help="scenario YAML (default: deploy/configs/tiny-cpu.yaml)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.steps=2")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the config, the model and the data files and print what a run would do; "
                         "starts nothing, downloads nothing (exit 2 when something is missing)")
    args = ap.parse_intermixed_args(argv)  # --config may come after overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from trainer.dry_run import dry_run  # reads the Hub cache: only this path needs huggingface_hub

        return dry_run(cfg, args.config)
    from trainer.cluster import exit_on_sigterm  # the run's imports (torch, Ray) wait until one is asked for
    from trainer.driver import GRPORecipe, RunStopped

    exit_on_sigterm()
    recipe = GRPORecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        summary = recipe.summary()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        recipe.summary()
        print(f"run stopped: {e}", file=sys.stderr)
        return 1
    finally:
        recipe.cleanup()
    print("summary: " + json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
