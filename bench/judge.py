"""Judge service throughput and verdict-cache savings.

1. judgments/s through the Serve app's `score` handle at 1, 16 and 64 concurrent requests, side by
   side on the same tiny text judge: the `hf` backend (transformers in the replica) and the
   `openai` backend against a real server (vLLM's OpenAI server, the CPU twin of the reference
   sglang command), free-form and with the verdict constrained (judge.constrain=choice). Every
   request is a distinct answer (no cache hits). A random-init model rarely says CORRECT/INCORRECT
   unconstrained, so most free-form judgments take two generations (the unparseable retry) and
   then count as failures; the table shows generations per judgment and failures.
2. the cache hit rate and judge calls saved on a GRPO-shaped batch (n=8 samples per prompt) of
   synthetic answers: a policy's 8 samples of one prompt repeat answers, often up to case/spaces.

Usage: python -m bench.judge [--prompts 32] [--requests 128] [--backends hf,openai,openai-choice]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time

from bench.runner import free_port, local_cluster, print_headline, print_table
from services.judge.reward import ScoreRequest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def grpo_batch(prompts: int, n: int, seed: int = 0):
    """Synthetic GRPO batch: per prompt, n answers drawn like a policy's samples would fall."""
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


def measure(handle, requests_per_level: int, tag: str) -> list[dict]:
    handle.score.remote(ScoreRequest("<answer>warm</answer>", "warm-up?", "x")).result()
    rows = []
    for c in (1, 16, 64):
        reqs = [ScoreRequest(f"<think>t</think><answer>answer {tag} {c}-{i}</answer>", f"Q{c}-{i}?", "blue")
                for i in range(requests_per_level)]
        before = handle.stats.remote().result()
        secs = asyncio.run(drive(handle, reqs, c))
        after = handle.stats.remote().result()
        gens = after["calls"] - before["calls"]
        rows.append({"concurrency": c, "judgments": len(reqs), "seconds": secs,
                     "judgments_per_s": len(reqs) / secs, "generations_per_judgment": gens / len(reqs),
                     "failed": after["failed_results"] - before["failed_results"]})
    return rows


def run_backends(backends: list[str], requests: int, prompts: int) -> dict:
    """Part 1 on each backend, then part 2 with the cache on, on the last one; the judge server
    (for the openai backends) and the cluster are released on the way out."""
    # heavy: Serve and the judge app (Ray) only once the benchmark runs, not for --help
    from ray import serve

    from services.judge.app import build_app
    from services.judge.hf import tiny_text_model_path
    from services.judge.local_server import LocalOpenAIServer

    cache = os.environ.get("DEEPEYES_TEST_CACHE") or tempfile.mkdtemp(prefix="judge-bench-")
    server = None
    if any(b.startswith("openai") for b in backends):
        server = LocalOpenAIServer(tiny_text_model_path(cache), free_port(), os.path.join(cache, "judge-server.log"))
        server.start()
    common = [f"model.cache_dir={cache}", "serve.judge.num_cpus=1", "judge.cache_size=0"]
    per_backend: dict[str, list[dict]] = {}
    try:
        with local_cluster(4, serve=True, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}):
            for b in backends:
                base_url = f"judge.base_url={server.base_url if server else ''}"
                extra = {"hf": ["judge.backend=hf"], "openai": ["judge.backend=openai", base_url],
                         "openai-choice": ["judge.backend=openai", base_url, "judge.constrain=choice"]}[b]
                handle = serve.run(build_app({"overrides": common + extra}), name="judge", route_prefix="/judge")
                per_backend[b] = measure(handle, requests, b)
            # the GRPO-shaped batch with the cache on, on the last backend
            handle = serve.run(build_app({"overrides": [*common[:-1], *extra]}), name="judge", route_prefix="/judge")
            batch = grpo_batch(prompts, 8)
            before = handle.stats.remote().result()
            secs = asyncio.run(drive(handle, batch, 64))
            after = handle.stats.remote().result()
    finally:
        if server is not None:
            server.stop()
    return {"server": server, "per_backend": per_backend, "total": len(batch), "secs": secs,
            **{k: after[f"cache_{k}"] - before[f"cache_{k}"] for k in ("hits", "misses", "shared_inflight")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=128, help="judgments per concurrency level")
    ap.add_argument("--prompts", type=int, default=32, help="prompts of the GRPO batch (x8 samples)")
    ap.add_argument("--backends", default="hf,openai,openai-choice",
                    help="hf, openai (vLLM server, free-form), openai-choice (vLLM server, constrained)")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    r = run_backends(backends, args.requests, args.prompts)
    server, total, hits, misses = r["server"], r["total"], r["hits"], r["misses"]

    print(f"\njudge service on the tiny text judge ({args.requests} distinct judgments per level); "
          f"openai = vLLM's OpenAI server (started in {server.start_s:.1f} s)" if server else "")
    headline: dict = {}
    rows = []
    for b, per_level in r["per_backend"].items():
        base = per_level[0]["judgments_per_s"]
        rows += [(b, x["concurrency"], x["judgments_per_s"], x["judgments_per_s"] / base,
                  x["generations_per_judgment"], x["failed"]) for x in per_level]
        headline[b] = {f"judgments_per_s_c{x['concurrency']}": round(x["judgments_per_s"], 2) for x in per_level}
        headline[b]["failed_share"] = round(sum(x["failed"] for x in per_level)
                                            / sum(x["judgments"] for x in per_level), 3)
    print_table([("backend", ">14"), ("concurrency", ">11"), ("judgments/s", ">12.1f"), ("x vs c=1", ">9.2f"),
                 ("gens/judgment", ">14.2f"), ("failed", ">7")], rows, sep=" ")
    print(f"\nGRPO-shaped batch ({backends[-1]}): {args.prompts} prompts x 8 samples = {total} requests at "
          f"concurrency 64, {r['secs']:.2f} s")
    print(f"  judge calls: {misses}  cache hits: {hits} (of which shared in-flight: {r['shared_inflight']})  "
          f"hit rate: {hits / total:.3f}  calls saved: {1 - misses / total:.1%}")
    if server:
        headline["server_start_s"] = round(server.start_s, 1)
    headline.update(grpo_cache_hit_rate=round(hits / total, 3), grpo_calls_saved=round(1 - misses / total, 3))
    print_headline(headline)


if __name__ == "__main__":
    main()
