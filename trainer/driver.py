"""The GRPO recipe: setup (cluster, policy, data, services), train (Ray Train), summary, cleanup.

Features and the flag that controls each:
- cluster: joins `ray.address` / RAY_ADDRESS / a running cluster, else starts a local one.
- services: deploys the tools, judge and rollout Serve apps unless they already run
  (`serve.use_running`), with replicas and resources from `serve.*`.
- policy: `model.path` (tiny = built offline), `model.warm_start` (cached cold-start SFT).
- data: `data.train_files` / `data.val_files`, or a synthetic set written into the run folder.
- training: `trainer.*` (GRPO, DAPO dynamic sampling, over-turn masking, clip-high, KL).
- resume: `trainer.resume=auto` continues from the run folder's latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from deepeyes.config import Config, ConfigError, to_dict
from deepeyes.data import ZOOM_TASKS, ParquetRows, write_synthetic, write_synthetic_suite
from deepeyes.policy_family import check_family, resolve_family
from trainer.checkpoint import STARTUP_FILE, STATE_FILE, STOPPED_FILE, latest_checkpoint
from trainer.cluster import connect_ray, deploy_services, release_cluster, trainer_without_pg_cleaner
from trainer.loop import total_steps
from trainer.metrics import STEP_PHASES, read_metrics
from trainer.sft import prepared_policy_path
from trainer.worker import train_loop_per_worker

log = logging.getLogger("deepeyes.driver")


class GRPORecipe:
    """One GRPO run: `setup()`, `train()`, `summary()`, `cleanup()`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir).expanduser().resolve()
        self.started_ray = False
        self.deployed: list[str] = []
        self.t0 = time.perf_counter()
        self.t0_wall = time.time()  # the workers measure their start against it
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.resume_from = None
        if cfg.trainer.resume:
            self.resume_from = latest_checkpoint(self.run_dir) if cfg.trainer.resume == "auto" else Path(cfg.trainer.resume)
            if cfg.trainer.resume != "auto" and not (self.resume_from / STATE_FILE).exists():
                raise ConfigError(f"trainer.resume={cfg.trainer.resume}: no {STATE_FILE} there")
            if self.resume_from is None:
                log.warning("trainer.resume=auto: no checkpoint under %s, starting fresh", self.run_dir)
        elif latest_checkpoint(self.run_dir) is not None:
            raise ConfigError(f"{self.run_dir} already holds checkpoints: pass trainer.resume=auto to "
                              f"continue that run, or choose a new trainer.run_dir")
        try:  # every service and worker reads the same resolved family and box scale
            self.cfg = cfg = resolve_family(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

        t = time.perf_counter()
        self.policy_dir = prepared_policy_path(cfg, progress=cfg.logging.progress)
        try:
            check_family(cfg, self.policy_dir)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.timings["policy_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.train_files, self.val_files = prepare_data(cfg, self.run_dir)
        # Check, do not read: every file's schema (metadata) and a bounded sample of rows; the
        # Train workers stream the rows themselves, so start-up does not grow with the data.
        # Local paths go out absolute (workers may run elsewhere; the files must be readable there).
        self.train_files = [f if "://" in f else os.path.abspath(f) for f in self.train_files]
        self.val_files = [f if "://" in f else os.path.abspath(f) for f in self.val_files]
        train = ParquetRows(self.train_files, cfg.data)  # a file lacking a column fails here
        val = ParquetRows(self.val_files, cfg.data) if self.val_files else None
        try:
            if len(train) == 0:
                raise ValueError(f"no rows left in {self.train_files} (skipped: {dict(train.skipped.counts)})")
            train.sample_check()
            if val is not None:
                val.sample_check()
        except ValueError as e:
            raise ConfigError(f"no usable data rows: {e}") from None
        log.info("training data: %d rows in %d row groups of %d file(s); rows are checked as they stream "
                 "(skipped so far: %s)", len(train), len(train.groups), len(self.train_files),
                 dict(train.skipped.counts) or "none")
        self.steps = total_steps(cfg, len(train))
        self.timings["data_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.started_ray = connect_ray(cfg)
        self.timings["ray_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.deployed = deploy_services(cfg, self.run_dir, self.policy_dir)
        self.timings["deploy_s"] = time.perf_counter() - t

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig  # Ray Train: only a run needs it
        from ray.train.torch import TorchTrainer

        cfg = self.cfg
        loop_config = {
            "config": to_dict(cfg), "run_dir": str(self.run_dir), "policy_dir": str(self.policy_dir),
            "train_files": list(self.train_files), "val_files": list(self.val_files),
            "resume_from": str(self.resume_from) if self.resume_from else "",
            "t0_wall": self.t0_wall, "fit_wall": time.time(),
        }
        trainer_cls = TorchTrainer
        if self.started_ray and not cfg.ray.include_dashboard:
            trainer_cls = trainer_without_pg_cleaner(TorchTrainer)
        trainer = trainer_cls(
            train_loop_per_worker, train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=cfg.trainer.num_workers, use_gpu=cfg.trainer.use_gpu,
                                         resources_per_worker={"CPU": cfg.trainer.cpus_per_worker}),
            # a restarted worker group resumes from the latest checkpoint (train_loop_per_worker)
            run_config=RunConfig(name="train", storage_path=str(self.run_dir),
                                 failure_config=FailureConfig(max_failures=cfg.trainer.max_failures)))
        stopped = self.run_dir / STOPPED_FILE
        stopped.unlink(missing_ok=True)
        t = time.perf_counter()
        error: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as e:  # surfaced below, in the main thread
                error.append(e)

        worker = threading.Thread(target=fit, daemon=True)
        worker.start()
        follow_progress(self.run_dir, worker, cfg.logging.progress, self.steps)
        worker.join()
        self.timings["train_s"] = time.perf_counter() - t
        if error:
            raise error[0]
        if stopped.exists():
            raise RunStopped(json.loads(stopped.read_text())["reason"])

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict[str, Any]:
        rows = [r for r in read_metrics(self.run_dir) if "reward/score" in r]
        val = [r for r in read_metrics(self.run_dir) if "val/acc" in r]
        out: dict[str, Any] = {"run_dir": str(self.run_dir), "steps": len(rows),
                               "wall_s": round(time.perf_counter() - self.t0, 1),
                               "setup_s": {k: round(v, 1) for k, v in self.timings.items()}}
        if rows:
            keys = ["reward/score", "reward/acc", "reward/format", "reward/tool", "rollout/tool_calls",
                    "rollout/tool_errors", "rollout/num_turns", "actor/entropy"]
            k = min(5, len(rows))  # one step's batch is noisy: compare the first and last k steps
            out[f"first_{k}_steps_mean"] = {m: round(sum(r.get(m, 0.0) for r in rows[:k]) / k, 4) for m in keys}
            out[f"last_{k}_steps_mean"] = {m: round(sum(r.get(m, 0.0) for r in rows[-k:]) / k, 4) for m in keys}
            total = sum(r.get("timing/step_s", 0.0) for r in rows)
            out["phase_split"] = {p: round(sum(r.get(f"timing/{p}_s", 0.0) for r in rows) / max(total, 1e-9), 3)
                                  for p in STEP_PHASES}
        startup = self.run_dir / STARTUP_FILE
        if startup.exists():  # the start-up, broken down: what a user waits for before step 1
            worker = json.loads(startup.read_text())
            parts = {k: round(v, 1) for k, v in self.timings.items() if k != "train_s"}
            parts.update({k: round(v, 1) for k, v in worker.items() if k != "first_request_s"})
            out["startup_s"] = {"to_first_rollout": round(worker["first_request_s"], 1), **parts}
        if val:
            out["validation"] = {k: round(v, 4) for k, v in val[-1].items() if k.startswith("val/")}
        if self.cfg.logging.plots and rows:
            from trainer.plots import render_plots  # matplotlib: only when plotting

            out["plots"] = [str(p) for p in render_plots(self.run_dir)]
        (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2))
        return out

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        release_cluster(self.started_ray, self.deployed)


# ---------------------------------------------------------------------------------------------


def prepare_data(cfg: Config, run_dir: Path) -> tuple[list[str], list[str]]:
    """Parquet files to train and validate on (synthetic ones written into the run folder)."""
    train = list(cfg.data.train_files)
    val = list(cfg.data.val_files)
    data_dir = run_dir / "data"
    if not train:
        (data_dir / "train").mkdir(parents=True, exist_ok=True)
        task = cfg.data.synthetic_task
        zoom = task in ZOOM_TASKS
        if zoom:
            train = [write_synthetic(str(data_dir / "train" / f"{task}.parquet"), cfg.data.synthetic_train_rows,
                                     cfg.data.synthetic_seed, mix={task: 1.0}, split="train")]
        else:
            train = write_synthetic_suite(str(data_dir / "train"), cfg.data.synthetic_train_rows,
                                          cfg.data.synthetic_seed, split="train")
        if not val and cfg.data.synthetic_val_rows > 0:
            val = [write_synthetic(str(data_dir / "val.parquet"), cfg.data.synthetic_val_rows,
                                   cfg.data.synthetic_seed, mix={task if zoom else "vstar": 1.0}, split="val")]
    for f in train + val:
        if not Path(f).exists():
            raise ConfigError(f"data file {f} does not exist (data.train_files / data.val_files)")
    return [str(Path(f).resolve()) for f in train], [str(Path(f).resolve()) for f in val]


class RunStopped(RuntimeError):
    """The loop stopped early for a reason a user must act on (e.g. a judge that keeps failing)."""


def follow_progress(run_dir: Path, worker: threading.Thread, enabled: bool, steps: int) -> None:
    """The one place that shows a run's progress, fed by metrics.jsonl while Ray Train runs: a bar
    (step, reward, tool calls, ETA) or, with the bar off, one line per step; one line per validation.

    The workers print nothing themselves: Ray forwarded each of their lines to the log twice.
    """
    def rows_now() -> list[dict[str, float]]:
        try:
            return read_metrics(run_dir)
        except ValueError:  # a line being written: read it next time
            return []

    def key(row: dict[str, float]) -> tuple[int, bool]:
        return int(row["step"]), "val/acc" in row

    rows = rows_now()
    shown = {key(r) for r in rows}  # a resumed run's earlier rows are not shown again
    done = len([r for r in rows if "reward/score" in r])
    bar = tqdm(desc="GRPO", unit="step", total=steps, initial=done, file=sys.stderr,
               dynamic_ncols=True) if enabled else None
    t0, first = time.perf_counter(), done
    say = bar.write if bar is not None else (lambda line: print(line, file=sys.stderr, flush=True))
    alive = True
    while alive:
        worker.join(timeout=1.0)
        alive = worker.is_alive()  # read once more after the end, for the last rows
        for row in rows_now():
            if key(row) in shown or not ("val/acc" in row or "reward/score" in row):
                continue
            shown.add(key(row))
            step = int(row["step"])
            if "val/acc" in row:
                say(f"validation at step {step}: " + " ".join(
                    f"{k}={v:.3f}" for k, v in row.items() if k.startswith("val/")))
            elif "reward/score" in row:
                done += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(step=step, score=f"{row['reward/score']:.3f}",
                                    tool_calls=f"{row['rollout/tool_calls']:.2f}")
                else:
                    eta = (time.perf_counter() - t0) / max(done - first, 1) * (steps - done)
                    say(f"step {step}/{steps} score={row['reward/score']:.3f} acc={row['reward/acc']:.2f} "
                        f"tool_calls={row['rollout/tool_calls']:.2f} turns={row['rollout/num_turns']:.2f} "
                        f"step_s={row.get('timing/step_s', 0.0):.1f} eta_s={eta:.0f}")
    if bar is not None:
        bar.close()