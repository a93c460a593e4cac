"""`python -m trainer --dry-run`: what a run of this config would do, checked without starting it.

Reads the config, says where the policy comes from (the tiny model, a local folder, or a Hugging
Face Hub id: in the cache, or to be downloaded at set-up), which data it reads (files that must
exist, or the synthetic set it writes), which judge it asks, the cluster and the Serve apps it
starts, and the training schedule. Nothing is started or downloaded; exit 2 when something the
run needs is missing, naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

from deepeyes.config import Config
from deepeyes.hub import describe, is_hub_id


def dry_run(cfg: Config, scenario: str | None) -> int:
    problems: list[str] = []
    lines = [f"scenario: {scenario or 'deploy/configs/tiny-cpu.yaml (default)'}"]
    model = describe(cfg.model.path)
    lines.append(model)
    if cfg.model.path != "tiny" and not is_hub_id(cfg.model.path) and "no model folder" in model:
        problems.append(model)
    if cfg.data.train_files:
        for f in [*cfg.data.train_files, *cfg.data.val_files]:
            there = "://" in f or Path(os.path.expanduser(f)).exists()
            lines.append(f"data: {f} ({'found' if there else 'MISSING'})")
            if not there:
                problems.append(f"data file {f} does not exist (data.train_files / data.val_files)")
    else:
        lines.append(f"data: synthetic '{cfg.data.synthetic_task}', {cfg.data.synthetic_train_rows} training rows "
                     f"and {cfg.data.synthetic_val_rows} validation rows, written into the run folder")
    judge = cfg.judge.backend + (f" at {cfg.judge.base_url}" if cfg.judge.backend == "openai" else "")
    probed = cfg.judge.check_at_startup and cfg.judge.backend in ("openai", "serve-llm")
    lines.append(f"judge: {judge}" + (" (probed once when its app starts)" if probed else ""))
    where = cfg.ray.address or os.environ.get("RAY_ADDRESS", "") or "a new local cluster"
    lines.append(f"ray: {where}; Serve apps tools x{cfg.serve.tools.num_replicas}, judge x{cfg.serve.judge.num_replicas}, "
                 f"rollout x{cfg.serve.rollout.num_replicas} ({cfg.rollout.engine})")
    steps = f"{cfg.trainer.steps} steps" if cfg.trainer.steps else f"{cfg.trainer.epochs} epoch(s)"
    lines.append(f"training: {steps} of {cfg.trainer.batch_size} prompts x {cfg.rollout.n} episodes on "
                 f"{cfg.trainer.num_workers} Train worker(s), run folder {cfg.trainer.run_dir}")
    print("\n".join(lines))
    for p in problems:
        print(f"missing: {p}")
    print("dry run: " + ("ready" if not problems else f"{len(problems)} problem(s): a run would stop at set-up"))
    return 2 if problems else 0
