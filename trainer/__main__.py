"""deepeyes-ray GRPO driver.

  python -m trainer [--config deploy/configs/tiny-cpu.yaml] [key=value ...]   run GRPO
  python -m trainer plot RUN_DIR                                             render PNG curves
  python -m trainer --help                                                   this text + every knob

The tiny-cpu scenario (tiny Qwen2.5-VL, synthetic data, rule judge, local Ray cluster) is the
default. The same command works under `ray job submit --working-dir . -- python -m trainer ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from deepeyes.config import ConfigError, help_text, load_config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        ap = argparse.ArgumentParser(prog="python -m trainer plot", description="render PNG curves of a run")
        ap.add_argument("run_dir", help="run folder (holds metrics.jsonl)")
        args = ap.parse_args(argv[1:])
        from trainer.plots import render_plots

        for path in render_plots(args.run_dir):
            print(path)
        return 0
    ap = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="configuration keys (set in the YAML or as key=value; the defaults shown "
                                        "are the built-in ones, which a scenario YAML may change):\n" + help_text())
    ap.add_argument("--config", help="scenario YAML (default: deploy/configs/tiny-cpu.yaml)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.steps=2")
    args = ap.parse_intermixed_args(argv)  # --config may come after overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from trainer.driver import GRPORecipe, RunStopped, exit_on_sigterm

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
