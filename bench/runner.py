"""What the benchmarks share: the main job run in this process (GRPORecipe, which starts and
releases its own local Ray cluster), a bare local Ray cluster (with Serve when asked), the main
job as a child process (to inject faults into), /proc helpers, and the table and JSON headline
printers.

Ray and the trainer are imported inside the functions that need them, so a script's `--help`
and its parts that run without Ray (`bench.async --simulate-only`, `bench.step --skip-step`)
stay light. `bench.gpu_check` does not import this module: it runs where Ray is absent.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepeyes.config import load_config
from deepeyes.serving import APP_NAMES, DEPLOYMENT_NAMES
from services.tools.sandbox.pool import UID_BASE
from trainer.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent  # run child processes here: `bench` imports from it

# 4 prompts x n=4, one 64-token turn: the shape issues 13 and 17 measure
ISSUE_SHAPE = ["model.warm_start=false", "rollout.n=4", "trainer.batch_size=4", "rollout.max_assistant_turns=1",
               "rollout.max_new_tokens_per_turn=64", "rollout.max_response_length=64"]

# The chaos tests' job shape (tests/chaos/ run it through trainer_command) and fault_cost's.
CHAOS_SHAPE = ["rollout.n=2", "trainer.batch_size=2", "trainer.num_workers=2", "trainer.test_every=0",
               "trainer.val_rows=2", "rollout.max_new_tokens_per_turn=16", "rollout.max_response_length=128",
               "data.synthetic_train_rows=8", "data.synthetic_val_rows=2", "model.warm_start=false",
               "logging.progress=false", "trainer.lr=1e-2",
               "ray.include_dashboard=false"]  # 38 s less per run on 2 cores; the dashboard's own test: test_deploy_job


# ---- the main job in this process -----------------------------------------------------------


def job_config(run_dir: str, steps: int, overrides: Sequence[str] = (), *, synthetic_val_rows: bool = False) -> Any:
    """The main job's config for a bench run: `steps` steps into run_dir, no checkpoints, no test
    passes, no progress bars or plots, no synthetic validation rows (unless synthetic_val_rows),
    then `overrides`."""
    base = [f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", "trainer.save_every=0", "trainer.test_every=0"]
    if not synthetic_val_rows:
        base.append("data.synthetic_val_rows=0")
    return load_config(None, [*base, "logging.progress=false", "logging.plots=false", *overrides])


@dataclass
class JobRun:
    """One finished run of the main job and what was read around it."""

    run_dir: str
    cfg: Any
    recipe: Any                 # the GRPORecipe, cleaned up; its timings, policy_dir, train_files stay
    setup_s: float = 0.0        # GRPORecipe(cfg) through setup (and the rollout handle, with engine_stats)
    train_s: float = 0.0        # recipe.train()
    engine_before: dict = field(default_factory=dict)  # the rollout replica's stats() before train()
    engine_after: dict = field(default_factory=dict)   # ... and after it

    @property
    def engine_busy_s(self) -> float:
        """The rollout engine's busy seconds during train()."""
        return self.engine_after["engine_busy_s"] - self.engine_before["engine_busy_s"]

    def step_rows(self) -> list[dict]:
        """metrics.jsonl's training-step rows."""
        return [r for r in read_metrics(self.run_dir) if "timing/step_s" in r]

    def startup(self) -> dict:
        """The run's startup.json (time to the first rollout request and its parts)."""
        return json.loads((Path(self.run_dir) / "startup.json").read_text())


def after_first(rows: list[dict]) -> list[dict]:
    """The steps after the first (it pays one-off costs: imports, first forward), or all of them
    when there is only one."""
    return rows[1:] or rows


def rollout_handle() -> Any:
    """A handle on the running rollout deployment."""
    from ray import serve  # heavy: Ray only once a job runs

    return serve.get_deployment_handle(DEPLOYMENT_NAMES["rollout"], app_name=APP_NAMES["rollout"])


def run_job(cfg: Any, *, engine_stats: bool = False, after_setup: Callable[[], None] | None = None,
            before_cleanup: Callable[[], None] | None = None) -> JobRun:
    """The main job in this process: GRPORecipe(cfg).setup() (a local Ray cluster, the Serve apps,
    Ray Train), train(), and cleanup() (which releases the cluster) also when it fails.
    engine_stats: read the rollout replica's stats() before and after train(). after_setup is
    called once set up; before_cleanup right before cleanup(), also on a failure."""
    from trainer.driver import GRPORecipe  # heavy (torch; Ray at set-up): kept out of --help

    t0 = time.perf_counter()
    recipe = GRPORecipe(cfg)
    run = JobRun(run_dir=str(cfg.trainer.run_dir), cfg=cfg, recipe=recipe)
    try:
        recipe.setup()
        handle = rollout_handle() if engine_stats else None
        run.setup_s = time.perf_counter() - t0
        if handle is not None:
            run.engine_before = handle.stats.remote().result()
        if after_setup is not None:
            after_setup()
        t1 = time.perf_counter()
        recipe.train()
        run.train_s = time.perf_counter() - t1
        if handle is not None:
            run.engine_after = handle.stats.remote().result()
    finally:
        try:
            if before_cleanup is not None:
                before_cleanup()
        finally:
            recipe.cleanup()
    return run


# ---- a bare local cluster -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_cluster(num_cpus: int, *, serve: bool = False, **init_kwargs: Any) -> Iterator[int | None]:
    """A local Ray cluster of num_cpus (no dashboard, workers' logs not forwarded), with Serve's
    HTTP proxy on a free 127.0.0.1 port when serve; yields that port (None without Serve). Serve
    and Ray are shut down on the way out, also on an error."""
    import ray  # heavy: only the scripts that start a cluster need Ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **init_kwargs)
    try:
        if not serve:
            yield None
            return
        from ray import serve as ray_serve  # heavy: Serve only when asked for

        port = free_port()
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield port
        finally:
            ray_serve.shutdown()
    finally:
        ray.shutdown()


# ---- the main job as a child process --------------------------------------------------------


def trainer_command(run_dir: Path | str, cache: str, *extra: str) -> list[str]:
    """`python -m trainer` on CHAOS_SHAPE, into run_dir, with the models cached in cache."""
    return [sys.executable, "-m", "trainer", f"trainer.run_dir={run_dir}", f"model.cache_dir={cache}",
            *CHAOS_SHAPE, *extra]


def start_until(cmd: list[str], marker: str, timeout_s: float = 600.0) -> tuple[subprocess.Popen, list[str]]:
    """Start the job and read its output until a line holds marker (or it ends); (process, lines)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if marker in line or not line:
            break
    return proc, lines


# ---- /proc ----------------------------------------------------------------------------------


def process_cmdlines() -> dict[int, str]:
    """pid -> command line (NULs as spaces) of every live process that could be read."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            out[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers (a Ray actor's command line is `ray::<Class>...`; one
    job runs at a time, so these are that job's)."""
    return [pid for pid, cmd in process_cmdlines().items() if cmd.startswith("ray::RayTrainWorker")]


def serve_replica_pids(app: str, deployment: str) -> list[int]:
    """PIDs of the live Serve replicas of `deployment` in `app` (`ray::ServeReplica:<app>:<name>...`)."""
    return [pid for pid, cmd in process_cmdlines().items() if cmd.startswith(f"ray::ServeReplica:{app}:{deployment}")]


def sandbox_kernel_pids() -> list[int]:
    """PIDs of processes under a sandbox kernel's uid (a root pool gives each kernel its own, from
    UID_BASE up): the kernels and anything they started."""
    out = []
    for pid in process_cmdlines():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # gone meanwhile
            continue
        if next((int(l.split()[1]) for l in status.splitlines() if l.startswith("Uid:")), 0) >= UID_BASE:
            out.append(pid)
    return out


# ---- output ---------------------------------------------------------------------------------

_SPEC = re.compile(r"([<>^])(\d+)")


def print_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]], sep: str = "") -> None:
    """A header line and one line per row. columns: (heading, format spec) pairs, each spec with
    its alignment and width first (">9.3f", "<24", ">8"); a heading takes its column's alignment
    and width, a str cell is padded to them as is, any other cell is formatted by the spec."""
    pads = []
    for heading, spec in columns:
        m = _SPEC.match(spec)
        if m is None:
            raise ValueError(f"column {heading!r}: spec {spec!r} does not start with an alignment and a width")
        pads.append(m.group(0))
    print(sep.join(format(h, pad) for (h, _), pad in zip(columns, pads)))
    for row in rows:
        print(sep.join(format(cell, pad if isinstance(cell, str) else spec)
                       for cell, (_, spec), pad in zip(row, columns, pads)))


def print_headline(headline: dict) -> None:
    """The one JSON line of headline figures every benchmark ends with."""
    print(json.dumps(headline), flush=True)
