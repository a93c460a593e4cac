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
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from deepeyes.config import Config, ConfigError, to_dict
from deepeyes.serving import APP_NAMES, ROUTE_PREFIXES
from trainer.checkpoint import STARTUP_FILE, STATE_FILE, STOPPED_FILE
from trainer.metrics import STEP_PHASES

log = logging.getLogger("deepeyes.driver")

# Ray Train's controller polls workers every 2 s by default: each report() would wait that long.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "TOKENIZERS_PARALLELISM": "false",
             # Serve probes each new replica's queue length with a 0.1 s deadline that backs off
             # to 1 s; a replica still starting on a busy 2-core node misses it and each miss is a
             # warning ("Failed to get queue length from Replica", 22 in one rescale).
             "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
             "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5.0"}


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
        from trainer.checkpoint import latest_checkpoint

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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

        t = time.perf_counter()
        self.policy_dir = prepare_policy(cfg)
        self.timings["policy_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.train_files, self.val_files = prepare_data(cfg, self.run_dir)
        from deepeyes.data import ParquetRows
        from trainer.loop import total_steps

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
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from trainer.loop import train_loop_per_worker

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
        from trainer.metrics import read_metrics

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
            from trainer.plots import render_plots

            out["plots"] = [str(p) for p in render_plots(self.run_dir)]
        (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2))
        return out

    # ------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        release_cluster(self.started_ray, self.deployed)


# ---------------------------------------------------------------------------------------------


def prepare_policy(cfg: Config) -> Path:
    """The policy folder the rollout replicas and Train workers load (tiny: built + warm start)."""
    from deepeyes.policy import resolve_policy_path

    base = resolve_policy_path(cfg.model)
    if not (base / "config.json").exists():
        raise ConfigError(f"model.path={cfg.model.path}: no model folder at {base} (config.json missing)")
    if cfg.model.path == "tiny" and cfg.model.tiny_perception_steps > 0:
        from trainer.perception import perceiving_policy_path

        log.info("perception pre-stage of the tiny policy (cached after the first run)...")
        base = perceiving_policy_path(cfg, base, progress=cfg.logging.progress)
    if cfg.model.path == "tiny" and cfg.model.warm_start:
        from trainer.sft import warm_started_policy_path

        log.info("cold-start SFT of the tiny policy (cached after the first run)...")
        return warm_started_policy_path(cfg, base, progress=cfg.logging.progress)
    return base


def prepare_data(cfg: Config, run_dir: Path) -> tuple[list[str], list[str]]:
    """Parquet files to train and validate on (synthetic ones written into the run folder)."""
    from deepeyes.data import ZOOM_TASKS, write_synthetic, write_synthetic_suite

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


def exit_on_sigterm() -> None:
    """SIGTERM (a job stop, a kill) unwinds like Ctrl-C, so cleanup stops what this run started.

    ray.init installs its own SIGTERM handler (which aborts), so this runs again after it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def trainer_without_pg_cleaner(base: type) -> type:
    """`base` (a Ray Train v2 trainer) without its placement-group cleaner.

    The cleaner is a detached actor that asks the state API every second whether the controller
    lives, to free its placement groups if the driver dies. The state API is served by the
    dashboard: on a local cluster started without one, every ask fails and logs a warning (31-205
    lines per run), and the cleaner protects nothing, since the cluster dies with this driver.
    """
    class Trainer(base):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self):  # Ray 2.60's hook; absent elsewhere, then no change
            return [c for c in super()._create_default_callbacks()
                    if type(c).__name__ != "PlacementGroupCleanerCallback"]

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    return Trainer


def release_cluster(started_ray: bool, deployed: list[str]) -> None:
    """Stop the cluster this process started, or on a shared cluster delete only the apps it deployed."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if started_ray:
        serve.shutdown()
        ray.shutdown()
    else:
        for name in deployed:
            serve.delete(name)


def connect_ray(cfg: Config) -> bool:
    """Join the cluster named by ray.address / RAY_ADDRESS, else start a local one. True if started."""
    import ray

    os.environ.update(TRAIN_ENV)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:  # `auto`, an address, or RAY_ADDRESS (set by `ray job submit`)
        ray.init(address=address, log_to_driver=True)
        exit_on_sigterm()
        return False
    # address="local": a fresh cluster even if `ray start` left one running on this machine.
    kwargs: dict[str, Any] = {"address": "local", "include_dashboard": cfg.ray.include_dashboard,
                              "runtime_env": {"env_vars": dict(TRAIN_ENV)}}
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.temp_dir:
        kwargs["_temp_dir"] = cfg.ray.temp_dir
    ray.init(**kwargs)
    exit_on_sigterm()
    return True


def deploy_services(cfg: Config, run_dir: Path, policy_dir: Path) -> list[str]:
    """Deploy tools, judge and rollout (those not running) together; returns the ones deployed."""
    from ray import serve

    from services.judge.app import build_app as judge_app
    from services.rollout.app import build_app as rollout_app
    from services.tools.app import build_app as tools_app

    # The judge app probes its judge once at start (judge.check_at_startup); an unreachable judge
    # fails that deploy with a message naming the URL, which wait_for_apps reports.
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    # An app still DEPLOYING (a `serve deploy` just issued) is present too: wait, don't redeploy.
    running = wait_for_apps({name for name, app in serve.status().applications.items()
                             if str(app.status).rsplit(".", 1)[-1] in ("RUNNING", "DEPLOYING")})
    args = {"config": str(run_dir / "config.yaml"), "overrides": [f"model.path={policy_dir}"]}
    targets = []
    for key, builder in (("tools", tools_app), ("judge", judge_app), ("rollout", rollout_app)):
        name = APP_NAMES[key]
        if name in running and cfg.serve.use_running:
            log.info("using the running Serve app %r", name)
            continue
        targets.append(serve.RunTarget(builder(args), name=name, route_prefix=ROUTE_PREFIXES[key]))
    if targets:  # one call: the replicas of all apps start side by side (13 s -> 9-10 s on 2 cores)
        serve.run_many(targets, wait_for_applications_running=True)
    return [t.name for t in targets]


def wait_for_apps(names: set[str], timeout_s: float = 600.0) -> set[str]:
    """Wait until these Serve apps are RUNNING; an app that fails is an error naming it."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: str(apps[n].status).rsplit(".", 1)[-1] for n in names if n in apps}
        failed = [n for n, st in states.items() if st in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            raise RuntimeError(f"Serve app(s) {failed} are {[states[n] for n in failed]}: see `serve status`")
        if all(st == "RUNNING" for st in states.values()):
            return set(states)
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve apps {states} not RUNNING after {timeout_s:.0f} s")
        time.sleep(1.0)


def follow_progress(run_dir: Path, worker: threading.Thread, enabled: bool, steps: int) -> None:
    """The one place that shows a run's progress, fed by metrics.jsonl while Ray Train runs: a bar
    (step, reward, tool calls, ETA) or, with the bar off, one line per step; one line per validation.

    The workers print nothing themselves: Ray forwarded each of their lines to the log twice.
    """
    from tqdm import tqdm

    from trainer.metrics import read_metrics

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