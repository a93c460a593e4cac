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

    python bench/async.py [--steps 8] [--simulate-only]

Ends with one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPE = ["model.warm_start=false", "rollout.n=4", "trainer.batch_size=4", "rollout.max_assistant_turns=1",
         "rollout.max_new_tokens_per_turn=64", "rollout.max_response_length=64"]
DEEPEYES_ONE_NODE = {"generate_s": 802.0, "old_logprob_s": 293.0, "update_s": 860.0}


def run_job(k: int, steps: int) -> dict:
    from ray import serve

    from deepeyes.config import load_config
    from deepeyes.serving import APP_NAMES, DEPLOYMENT_NAMES
    from trainer.driver import GRPORecipe
    from trainer.metrics import read_metrics

    run_dir = tempfile.mkdtemp(prefix=f"bench-async-k{k}-")
    cfg = load_config(None, [f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", "trainer.save_every=0",
                             "trainer.test_every=0", "data.synthetic_val_rows=0", "logging.progress=false",
                             "logging.plots=false", f"trainer.max_staleness={k}", *SHAPE])
    recipe = GRPORecipe(cfg)
    try:
        recipe.setup()
        handle = serve.get_deployment_handle(DEPLOYMENT_NAMES["rollout"], app_name=APP_NAMES["rollout"])
        busy0 = handle.stats.remote().result()["engine_busy_s"]
        t0 = time.perf_counter()
        recipe.train()
        wall = time.perf_counter() - t0
        busy1 = handle.stats.remote().result()["engine_busy_s"]
    finally:
        recipe.cleanup()
    rows = [r for r in read_metrics(run_dir) if "timing/step_s" in r]
    steady = rows[1:] or rows
    step_s = statistics.median(r["timing/step_s"] for r in steady)
    total_step_s = sum(r["timing/step_s"] for r in rows)
    return {"k": k, "step_s": step_s, "wall_s": wall,
            "episodes_per_s": sum(r["rollout/episodes"] for r in rows) / total_step_s,
            "trainer_idle_share": statistics.median(r["timing/trainer_idle_share"] for r in steady),
            "rollout_idle_share": max(0.0, 1.0 - (busy1 - busy0) / total_step_s),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="GRPO steps per run (the first is warm-up)")
    ap.add_argument("--ks", default="0,1,2", help="max_staleness values to run side by side")
    ap.add_argument("--simulate-only", action="store_true", help="only the cluster prediction (no Ray)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    headline: dict = {}
    if not args.simulate_only:
        runs = [run_job(int(k), args.steps) for k in args.ks.split(",")]
        print(f"\nmeasured here: 4 prompts x n=4, one 64-token turn, {args.steps} steps each (medians after the first)")
        print(f"{'k':>3}{'step s':>9}{'episodes/s':>12}{'trainer idle':>14}{'rollout idle':>14}"
              f"{'staleness':>11}{'dropped':>9}{'vs k=0':>8}")
        base = runs[0]["step_s"]
        for r in runs:
            print(f"{r['k']:>3}{r['step_s']:>9.3f}{r['episodes_per_s']:>12.2f}{r['trainer_idle_share']:>14.1%}"
                  f"{r['rollout_idle_share']:>14.1%}{r['staleness_mean']:>11.2f}{r['stale_dropped']:>9.0f}"
                  f"{base / r['step_s']:>7.2f}x")
        headline["measured"] = {f"k{r['k']}": {"step_s": round(r["step_s"], 3), "speedup": round(base / r["step_s"], 2),
                                               "trainer_idle": round(r["trainer_idle_share"], 3),
                                               "rollout_idle": round(r["rollout_idle_share"], 3)} for r in runs}
    sim = simulate()
    print("\npredicted on a cluster (DeepEyes one-node phase times; model in this file's docstring; "
          "separate old-log-prob pass off, publish 10 s)")
    print(f"{'rollout GPUs':>13}{'train GPUs':>11}{'colocated sync s':>18}{'sync s':>9}{'async s':>9}"
          f"{'async/sync':>11}{'vs colocated':>14}")
    for s in sim:
        print(f"{s['rollout_gpus']:>13}{s['train_gpus']:>11}{s['colocated_sync_s']:>18.0f}{s['sync_s']:>9.0f}"
              f"{s['async_s']:>9.0f}{s['async_vs_sync']:>10.2f}x{s['async_vs_colocated']:>13.2f}x")
    headline["predicted_async_vs_sync"] = {f"{s['rollout_gpus']}+{s['train_gpus']}": round(s["async_vs_sync"], 2)
                                           for s in sim}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
