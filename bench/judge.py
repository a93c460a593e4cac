"""Judge service throughput and verdict-cache savings.

1. judgments/s through the Serve app's `score` handle at 1, 16 and 64 concurrent requests, `hf`
   backend on the tiny text model (every request a distinct answer: no cache hits). A random-init
   model rarely says CORRECT/INCORRECT, so most judgments take two generations (the unparseable
   retry); the table shows generations per judgment so the figure can be read either way.
2. the cache hit rate and judge calls saved on a GRPO-shaped batch (n=8 samples per prompt) of
   synthetic answers: a policy's 8 samples of one prompt repeat answers, often up to case/spaces.

Usage: python bench/judge.py [--prompts 32] [--requests 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grpo_batch(prompts: int, n: int, seed: int = 0):
    """Synthetic GRPO batch: per prompt, n answers drawn like a policy's samples would fall."""
    from services.judge.reward import ScoreRequest

    rng = random.Random(seed)
    colours = ["red", "blue", "green", "yellow", "white", "black"]
    out = []
    for p in range(prompts):
        opts = rng.sample(colours, 4)
        truth = rng.randrange(4)
        q = (f"[{p}] What colour is the marked object? "
             + " ".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(opts)))
        for _ in range(n):
            r = rng.random()
            if r < 0.5:      # the right option, as text or letter, in some casing
                ans = rng.choice([opts[truth], opts[truth].capitalize(), "ABCD"[truth], f" {opts[truth]}."])
            elif r < 0.85:   # a distractor
                k = rng.choice([i for i in range(4) if i != truth])
                ans = rng.choice([opts[k], "ABCD"[k]])
            else:            # a free-form sentence
                ans = f"I think it is {rng.choice(colours)} near the {rng.choice(['top', 'left', 'edge'])}"
            out.append(ScoreRequest(f"<think>look</think><answer>{ans}</answer>", q, "ABCD"[truth]))
    return out


async def drive(handle, requests, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(req):
        async with sem:
            return await handle.score.remote(req)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in requests))
    assert len(results) == len(requests)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=128, help="judgments per concurrency level")
    ap.add_argument("--prompts", type=int, default=32, help="prompts of the GRPO batch (x8 samples)")
    args = ap.parse_args()

    import ray
    from ray import serve

    from services.judge.app import build_app
    from services.judge.reward import ScoreRequest

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    cache = os.environ.get("DEEPEYES_TEST_CACHE") or tempfile.mkdtemp(prefix="judge-bench-")
    handle = serve.run(build_app({"overrides": ["judge.backend=hf", f"model.cache_dir={cache}",
                                                "serve.judge.num_cpus=1"]}),
                       name="judge", route_prefix="/judge")
    handle.score.remote(ScoreRequest("<answer>warm</answer>", "warm-up?", "x")).result()

    rows = []
    for c in (1, 16, 64):
        reqs = [ScoreRequest(f"<think>t</think><answer>answer {c}-{i}</answer>", f"Q{c}-{i}?", "blue")
                for i in range(args.requests)]
        before = handle.stats.remote().result()
        secs = asyncio.run(drive(handle, reqs, c))
        after = handle.stats.remote().result()
        gens = after["calls"] - before["calls"]
        batches = after["generate_calls"] - before["generate_calls"]
        rows.append({"concurrency": c, "judgments": len(reqs), "seconds": secs,
                     "judgments_per_s": len(reqs) / secs, "generations_per_judgment": gens / len(reqs),
                     "requests_per_generate_batch": gens / max(1, batches),
                     "failed": after["failed_results"] - before["failed_results"]})

    batch = grpo_batch(args.prompts, 8)
    before = handle.stats.remote().result()
    secs = asyncio.run(drive(handle, batch, 64))
    after = handle.stats.remote().result()
    hits = after["cache_hits"] - before["cache_hits"]
    misses = after["cache_misses"] - before["cache_misses"]
    shared = after["cache_shared_inflight"] - before["cache_shared_inflight"]
    serve.shutdown()
    ray.shutdown()

    base = rows[0]["judgments_per_s"]
    print(f"\njudge service, hf backend on the tiny text model ({args.requests} distinct judgments per level)")
    print(f"{'concurrency':>11} {'judgments/s':>12} {'x vs c=1':>9} {'gens/judgment':>14} {'reqs/batch':>11} {'failed':>7}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['judgments_per_s']:>12.1f} {r['judgments_per_s'] / base:>9.2f} "
              f"{r['generations_per_judgment']:>14.2f} {r['requests_per_generate_batch']:>11.1f} {r['failed']:>7}")
    total = len(batch)
    print(f"\nGRPO-shaped batch: {args.prompts} prompts x 8 samples = {total} requests at concurrency 64, {secs:.2f} s")
    print(f"  judge calls: {misses}  cache hits: {hits} (of which shared in-flight: {shared})  "
          f"hit rate: {hits / total:.3f}  calls saved: {1 - misses / total:.1%}")
    headline = {f"judgments_per_s_c{r['concurrency']}": round(r["judgments_per_s"], 2) for r in rows}
    headline.update(grpo_cache_hit_rate=round(hits / total, 3), grpo_calls_saved=round(1 - misses / total, 3))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
