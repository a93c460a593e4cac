"""Benchmark of the agentic tools' cores: the python sandbox and the offline search.

Side by side in one run, on the pool and index the Serve deployments use (services/tools/):
  - kernel start: the pool's template (a Python with numpy, PIL and matplotlib imported, once per
    pool), a kernel forked from it on demand (create with no warm spare: fork, namespaces,
    Landlock, seccomp, first answer) and a create served by a warm spare;
  - call latency p50/p99 of a small code call (`x = x + 1; print(x)`, state kept) with 1 and 32
    trajectories calling at once, each on its own kernel (32 kernels: what one replica holds
    when a GRPO step's episodes all code at once);
  - a figure call (matplotlib plot returned as PNG) at 1 caller;
  - search queries per second over the demo corpus (10k documents), 1 and 8 threads.
It prints one table, then one JSON line of headline figures.

    python -m bench.sandbox            # about 10 s on 2 cores (6.5 s measured)
    python -m bench.sandbox --quick    # fewer calls
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from PIL import Image

from bench.runner import print_headline, print_table
from deepeyes.images import encode_png
from services.tools.sandbox.pool import KernelPool, SandboxLimits
from services.tools.search.corpus import demo_documents, ensure_demo_index
from services.tools.search.index import SearchIndex

FIGURE = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.show()"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def kernel_start(root: Path, image: bytes, n: int) -> tuple[list[float], list[float], float]:
    """Seconds of `create` + first answer with no spare (a fork) and with a warm spare ready, and
    the template's own start."""
    cold, warm, template = [], [], float("nan")
    with_spares = KernelPool(root, SandboxLimits(), spares=1)
    no_spares = KernelPool(root, SandboxLimits(), spares=0)
    try:
        for i in range(n):
            t0 = time.perf_counter()
            no_spares.create(f"cold-{i}", image)
            no_spares.execute(f"cold-{i}", "pass", 60)  # the kernel answers: it has started
            cold.append(time.perf_counter() - t0)
            no_spares.release(f"cold-{i}")
            wait_for_spare(with_spares)
            t0 = time.perf_counter()
            with_spares.create(f"warm-{i}", image)
            with_spares.execute(f"warm-{i}", "pass", 60)
            warm.append(time.perf_counter() - t0)
            with_spares.release(f"warm-{i}")
        template = float(no_spares.stats().get("template_start_s") or float("nan"))
    finally:
        with_spares.close()
        no_spares.close()
    return cold, warm, template


def wait_for_spare(pool: KernelPool, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.stats().get("spares", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)


def call_latency(root: Path, image: bytes, callers: int, calls: int, code: str) -> list[float]:
    """Latencies of `calls` calls per caller, each caller on its own kernel, all at once."""
    pool = KernelPool(root, SandboxLimits(), spares=0)
    lat: list[float] = []
    lock = threading.Lock()
    try:
        for i in range(callers):
            pool.create(f"s{i}", image)
            pool.execute(f"s{i}", "x = 0", 60)

        def one(i: int) -> None:
            for _ in range(calls):
                t0 = time.perf_counter()
                res = pool.execute(f"s{i}", code, 60)
                dt = time.perf_counter() - t0
                assert res.status == "ok", res.stderr[-500:]
                with lock:
                    lat.append(dt)

        with ThreadPoolExecutor(callers) as ex:
            list(ex.map(one, range(callers)))
    finally:
        pool.close()
    return lat


def search_qps(index: SearchIndex, queries: list[str], threads: int) -> float:
    per = [queries[i::threads] for i in range(threads)]
    run: Callable[[list[str]], None] = lambda qs: [index.search(q, 5) for q in qs]  # noqa: E731
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(run, per))
    return len(queries) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sandbox", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    args = ap.parse_args(argv)
    starts, calls = (2, 10) if args.quick else (5, 40)
    image = encode_png(Image.new("RGB", (448, 448), (40, 90, 160)))
    rows, head = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-sbx-") as d:
        root = Path(d)
        cold, warm, template = kernel_start(root, image, starts)
        rows += [("template start (once a pool)", 1, template * 1e3, template * 1e3),
                 ("kernel start, no spare", len(cold), statistics.median(cold) * 1e3, max(cold) * 1e3),
                 ("kernel start, warm spare", len(warm), statistics.median(warm) * 1e3, max(warm) * 1e3)]
        head.update(template_start_ms=template * 1e3, kernel_start_ms=statistics.median(cold) * 1e3,
                    kernel_start_warm_ms=statistics.median(warm) * 1e3)
        for callers in (1, 32):
            lat = call_latency(root, image, callers, max(2, calls // (4 if callers > 1 else 1)), "x = x + 1\nprint(x)")
            rows.append((f"code call, {callers} at once", len(lat), pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3))
            head.update({f"call_p50_ms_{callers}": pct(lat, 0.5) * 1e3, f"call_p99_ms_{callers}": pct(lat, 0.99) * 1e3})
        lat = call_latency(root, image, 1, max(2, calls // 4), FIGURE)
        rows.append(("figure call, 1 at once", len(lat), pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3))
        head["figure_call_p50_ms"] = pct(lat, 0.5) * 1e3
        index_path = ensure_demo_index(root / "search", n=10_000)
        queries = [f.question for f in demo_documents(10_000)[1]][:2000 if not args.quick else 400]
        with SearchIndex(index_path) as index:
            for threads in (1, 8):
                qps = search_qps(index, queries, threads)
                rows.append((f"search, {threads} thread(s)", len(queries), 1e3 / qps, float("nan")))
                head[f"search_qps_{threads}"] = qps
    print_table([("cell", "<28"), ("n", ">6"), ("p50 ms", ">10.1f"), ("p99/max ms", ">11.1f")], rows)
    print("(kernel start: p50 and max of create + first answer; search: mean ms per query, no p99)")
    print_headline({k: round(v, 3) for k, v in head.items()})


if __name__ == "__main__":
    main()
