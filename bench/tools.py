"""Benchmark of the zoom-in tool: the core in-process, the Serve handle by reference, the HTTP route.

For a 448x448 and a 3840x2160 source image (put in the model's frame with the 7B recipe's
max_pixels by default, so the 4K image stays about 3836x2156) and 1, 8 and 32 concurrent callers,
it measures crops/s and p50/p99 latency of
  (a) core:   `crop_image(image, args)` in this process (threads),
  (b) handle: `await handle.call.remote(name, image_arg(ref), args)` (image put once, by reference),
  (c) http:   `POST /tools/image_zoom_in_tool` with the base64 PNG (httpx, async),
and prints one table with the throughput ratio (b)/(a), then one JSON line of headline figures.
The boxes are the same on both images (100-300 px sides), so a cost that grows with the source
size is the transport's, not the crop's.

    python -m bench.tools            # about 1.5 minutes on 2 cores
    python -m bench.tools --quick    # shorter cells
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import threading
import time
from typing import Any, Awaitable, Callable

import httpx
import numpy as np
from PIL import Image

from bench.runner import local_cluster, print_headline
from deepeyes.contracts import image_arg
from services.tools.zoom import crop_image

BOXES = [[40, 40, 240, 240], [100, 60, 400, 200], [10, 300, 110, 420], [200, 100, 330, 330]]
NAME = "image_zoom_in_tool"


def source_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A synthetic photo-like image: smooth gradients plus rectangles (compresses like a photo-ish PNG)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([xs / w * 255, ys / h * 255, (xs + ys) / (w + h) * 255], -1)
    for _ in range(40):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        arr[y0:y0 + rng.integers(10, h // 4), x0:x0 + rng.integers(10, w // 4)] = rng.integers(0, 255, 3)
    arr += rng.normal(0, 4, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(latencies: list[float], wall: float) -> dict[str, float]:
    return {"n": len(latencies), "per_s": len(latencies) / wall,
            "p50_ms": 1e3 * statistics.median(latencies), "p99_ms": 1e3 * pct(latencies, 0.99)}


def run_threads(fn: Callable[[int], Any], concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` threads call fn(i) in a loop for `seconds`."""
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        i, mine = k, []
        while time.perf_counter() < stop:
            t = time.perf_counter()
            fn(i)
            mine.append(time.perf_counter() - t)
            i += concurrency
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return summarize(lat, time.perf_counter() - t0)


async def run_async(fn: Callable[[int], Awaitable[Any]], concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` coroutines await fn(i) in a loop for `seconds`."""
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await fn(i)
            lat.append(time.perf_counter() - t)
            i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return summarize(lat, time.perf_counter() - t0)


def measure_image(label: str, image: Image.Image, ref: Any, handle: Any, url: str, levels: list[int],
                  seconds: float) -> list[dict[str, Any]]:
    """One source image at each concurrency level: (a) core, (b) handle, (c) http."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    body_b64 = base64.b64encode(buf.getvalue()).decode()

    def core(i: int) -> None:
        assert crop_image(image, {"bbox_2d": BOXES[i % 4]}).ok

    async def via_handle(i: int) -> None:
        r = await handle.call.remote(NAME, image_arg(ref), {"bbox_2d": BOXES[i % 4]})
        assert r.ok, r.text

    rows = []
    for c in levels:
        a = run_threads(core, c, seconds)
        b = asyncio.run(run_async(via_handle, c, seconds))

        async def http_cell(c: int = c) -> dict[str, float]:
            limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                async def via_http(i: int) -> None:
                    r = await client.post(url, json={"image": body_b64, "arguments": {"bbox_2d": BOXES[i % 4]}})
                    assert r.status_code == 200 and r.json()["ok"], r.text[:200]
                return await run_async(via_http, c, seconds)

        h = asyncio.run(http_cell())
        rows.append({"image": label, "frame": f"{image.width}x{image.height}", "conc": c,
                     "core": a, "handle": b, "http": h, "ratio": b["per_s"] / a["per_s"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter cells (about 0.4 s each)")
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring time per cell")
    parser.add_argument("--max-pixels", type=int, default=12845056,
                        help="smart-resize bound of the model frame (default: the 7B recipe's)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    opts = parser.parse_args()
    seconds = 0.4 if opts.quick else opts.seconds

    # heavy: Ray and the policy's image helpers (torch) only once the benchmark runs, not for --help
    import ray
    from ray import serve

    from deepeyes.policy import resize_for_model
    from services.tools.app import build_app

    images = {"448x448": resize_for_model(source_image(448, 448), 3136, opts.max_pixels),
              "3840x2160": resize_for_model(source_image(3840, 2160, 1), 3136, opts.max_pixels)}

    rows: list[dict[str, Any]] = []
    cold: dict[str, float] = {}
    with local_cluster(4, serve=True) as port:
        handle = serve.run(build_app({}), name="tools", route_prefix="/tools")
        url = f"http://127.0.0.1:{port}/tools/{NAME}"
        for label, image in images.items():
            ref = ray.put(image)
            t = time.perf_counter()
            assert handle.call.remote(NAME, image_arg(ref), {"bbox_2d": BOXES[0]}).result().ok
            cold[label] = 1e3 * (time.perf_counter() - t)  # first call on a fresh ref: fetch + cache
            rows += measure_image(label, image, ref, handle, url, opts.concurrency, seconds)
    head = (f"{'source':>10} {'frame':>10} {'conc':>4} | {'core/s':>8} {'p50ms':>6} {'p99ms':>6} | "
            f"{'handle/s':>8} {'p50ms':>6} {'p99ms':>6} | {'http/s':>7} {'p50ms':>7} {'p99ms':>7} | (b)/(a)")
    print(head)
    print("-" * len(head))
    for r in rows:
        a, b, h = r["core"], r["handle"], r["http"]
        print(f"{r['image']:>10} {r['frame']:>10} {r['conc']:>4} | {a['per_s']:8.0f} {a['p50_ms']:6.3f} "
              f"{a['p99_ms']:6.3f} | {b['per_s']:8.0f} {b['p50_ms']:6.2f} {b['p99_ms']:6.2f} | "
              f"{h['per_s']:7.1f} {h['p50_ms']:7.1f} {h['p99_ms']:7.1f} | {r['ratio']:.3f}")
    print("first handle call on a fresh ref (fetch + cache), ms: "
          + ", ".join(f"{k} {v:.1f}" for k, v in cold.items()))

    by = {(r["image"], r["conc"]): r for r in rows}
    cmax = max(opts.concurrency)
    headline = {
        "handle_cost_4k_over_448_c1_p50": round(by[("3840x2160", 1)]["handle"]["p50_ms"]
                                                / by[("448x448", 1)]["handle"]["p50_ms"], 3)
        if 1 in opts.concurrency else None,
        f"handle_cost_4k_over_448_c{cmax}": round(by[("448x448", cmax)]["handle"]["per_s"]
                                                  / by[("3840x2160", cmax)]["handle"]["per_s"], 3),
        f"handle_over_core_tput_448_c{cmax}": round(by[("448x448", cmax)]["ratio"], 4),
        f"handle_crops_per_s_448_c{cmax}": round(by[("448x448", cmax)]["handle"]["per_s"], 1),
        f"http_crops_per_s_448_c{cmax}": round(by[("448x448", cmax)]["http"]["per_s"], 1),
        f"http_crops_per_s_4k_c{cmax}": round(by[("3840x2160", cmax)]["http"]["per_s"], 1),
    }
    print_headline(headline)


if __name__ == "__main__":
    main()
