"""Asynchronous rollout (trainer.max_staleness), measured here and predicted for a cluster (issue 17).

Measured: the real main job (local Ray, Serve apps, Ray Train, tiny policy) on the same shape for
the same number of steps with k = 0 (synchronous), 1 and 2, side by side in one run: wall seconds
per step, episodes per second, the trainer's idle share (the part of the step it waits for
episodes: timing/trainer_idle_share) and the rollout engine's idle share (1 - the replica's
engine-busy seconds over the run's step seconds), and the staleness of what was trained.
On this 2-core machine the rollout replica and the Train workers share the same cores, so the
overlap can only fill the cores' idle time.

Predicted (`--simulate`): a model of one step on a cluster with N rollout GPUs and M training
GPUs, from the phase times of a 7B recipe measured in the literature (DeepEyes, one node of 8
GPUs: generation G = 802 s, old log-prob O = 293 s, update U = 860 s). Assumptions: generation
scales as G * 8 / N, training as (O + U) * 8 / M (O = 0 when the separate old-log-prob pass is
off, as here by default), weight publishing P seconds. Then
    colocated synchronous (all 8 GPUs take turns):  G + O + U (no publish: the weights are in place)
    disaggregated synchronous (N + M GPUs):         G*8/N + (O+U)*8/M + P
    disaggregated async, one step ahead (k >= 1):   max(G*8/N, (O+U)*8/M) + P
(the pipeline here is one step deep, so k = 2 behaves as k = 1).

    python -m bench.async [--steps 8] [--simulate-only]

Ends with one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from bench.runner import ISSUE_SHAPE, after_first, job_config, print_headline, print_table, run_job

DEEPEYES_ONE_NODE = {"generate_s": 802.0, "old_logprob_s": 293.0, "update_s": 860.0}


def measure(k: int, steps: int) -> dict:
    """The main job with trainer.max_staleness=k for `steps` steps: medians of the steps after the
    first, episodes/s over the run, both idle shares, the staleness of what was trained."""
    run = run_job(job_config(tempfile.mkdtemp(prefix=f"bench-async-k{k}-"), steps,
                             [f"trainer.max_staleness={k}", *ISSUE_SHAPE]), engine_stats=True)
    rows = run.step_rows()
    steady = after_first(rows)
    step_s = statistics.median(r["timing/step_s"] for r in steady)
    total_step_s = sum(r["timing/step_s"] for r in rows)
    return {"k": k, "step_s": step_s, "wall_s": run.train_s,
            "episodes_per_s": sum(r["rollout/episodes"] for r in rows) / total_step_s,
            "trainer_idle_share": statistics.median(r["timing/trainer_idle_share"] for r in steady),
            "rollout_idle_share": max(0.0, 1.0 - run.engine_busy_s / total_step_s),
            "staleness_mean": statistics.fmean(r["async/staleness_mean"] for r in rows),
            "stale_dropped": sum(r["async/stale_dropped"] for r in rows),
            "score_last": rows[-1]["reward/score"]}


def simulate(gpus: tuple[tuple[int, int], ...] = ((4, 4), (6, 2), (2, 6)), publish_s: float = 10.0,
             with_old_logprob: bool = False) -> list[dict]:
    g, o, u = (DEEPEYES_ONE_NODE[k] for k in ("generate_s", "old_logprob_s", "update_s"))
    o = o if with_old_logprob else 0.0
    colocated = g + o + u  # DeepEyes' own one-node step is 1,955 s with its old-log-prob pass
    out = []
    for n, m in gpus:
        gen, train = g * 8 / n, (o + u) * 8 / m
        sync, async_ = gen + train + publish_s, max(gen, train) + publish_s
        out.append({"rollout_gpus": n, "train_gpus": m, "colocated_sync_s": colocated, "sync_s": sync,
                    "async_s": async_, "async_vs_sync": sync / async_, "async_vs_colocated": colocated / async_})
    return out


def print_measured(runs: list[dict], steps: int) -> dict:
    print(f"\nmeasured here: 4 prompts x n=4, one 64-token turn, {steps} steps each (medians after the first)")
    base = runs[0]["step_s"]
    print_table([("k", ">3"), ("step s", ">9.3f"), ("episodes/s", ">12.2f"), ("trainer idle", ">14.1%"),
                 ("rollout idle", ">14.1%"), ("staleness", ">11.2f"), ("dropped", ">9.0f"), ("vs k=0", ">8")],
                [(r["k"], r["step_s"], r["episodes_per_s"], r["trainer_idle_share"], r["rollout_idle_share"],
                  r["staleness_mean"], r["stale_dropped"], f"{base / r['step_s']:.2f}x") for r in runs])
    return {f"k{r['k']}": {"step_s": round(r["step_s"], 3), "speedup": round(base / r["step_s"], 2),
                           "trainer_idle": round(r["trainer_idle_share"], 3),
                           "rollout_idle": round(r["rollout_idle_share"], 3)} for r in runs}


def print_predicted(sim: list[dict]) -> dict:
    print("\npredicted on a cluster (DeepEyes one-node phase times; model in this file's docstring; "
          "separate old-log-prob pass off, publish 10 s)")
    print_table([("rollout GPUs", ">13"), ("train GPUs", ">11"), ("colocated sync s", ">18.0f"), ("sync s", ">9.0f"),
                 ("async s", ">9.0f"), ("async/sync", ">11"), ("vs colocated", ">14")],
                [(s["rollout_gpus"], s["train_gpus"], s["colocated_sync_s"], s["sync_s"], s["async_s"],
                  f"{s['async_vs_sync']:.2f}x", f"{s['async_vs_colocated']:.2f}x") for s in sim])
    return {f"{s['rollout_gpus']}+{s['train_gpus']}": round(s["async_vs_sync"], 2) for s in sim}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="GRPO steps per run (the first is warm-up)")
    ap.add_argument("--ks", default="0,1,2", help="max_staleness values to run side by side")
    ap.add_argument("--simulate-only", action="store_true", help="only the cluster prediction (no Ray)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    headline: dict = {}
    if not args.simulate_only:
        headline["measured"] = print_measured([measure(int(k), args.steps) for k in args.ks.split(",")], args.steps)
    headline["predicted_async_vs_sync"] = print_predicted(simulate())
    print_headline(headline)


if __name__ == "__main__":
    main()
