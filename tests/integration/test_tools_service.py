"""The tool service on a local Ray cluster: handle path (by reference and bytes), HTTP, fuzzing."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import zlib

import httpx
import numpy as np
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from ray import serve

from deepeyes.contracts import image_arg
from services.tools.app import build_app

pytestmark = pytest.mark.integration

TOKEN_ENV = "DEEPEYES_TEST_TOOLS_TOKEN"  # a test-only name, so the default app stays open


def coded_image(w: int, h: int) -> Image.Image:
    """R = x % 256, G = y % 256, B = 16*(x//256) + y//256: a crop's pixels tell where it came from."""
    ys, xs = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xs % 256, ys % 256, 16 * (xs // 256) + ys // 256], -1).astype(np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


IMAGE = coded_image(448, 336)


@pytest.fixture(scope="module")
def tools(ray_cluster):
    handle = serve.run(build_app({}), name="tools", route_prefix="/tools")
    yield {"handle": handle, "url": f"http://127.0.0.1:{ray_cluster['http_port']}/tools"}
    serve.delete("tools")


@pytest.fixture(scope="module")
def strict_tools(ray_cluster):
    """A second app with a bearer token, a small body cap and a timeout nothing can meet."""
    os.environ[TOKEN_ENV] = "s3cret"
    try:
        app = build_app({"overrides": [f"serve.auth_token_env={TOKEN_ENV}", "tools.timeout_s=0.000000001",
                                       "tools.max_request_bytes=100000"]})
    finally:
        del os.environ[TOKEN_ENV]
    handle = serve.run(app, name="tools-strict", route_prefix="/tools-strict")
    yield {"handle": handle, "url": f"http://127.0.0.1:{ray_cluster['http_port']}/tools-strict"}
    serve.delete("tools-strict")


def test_handle_by_reference_crops_and_caches(tools):
    h = tools["handle"]
    ref = ray.put(IMAGE)
    before = h.stats.remote().result()
    r = h.call.remote("image_zoom_in_tool", image_arg(ref), {"bbox_2d": [100, 50, 200, 150]}).result()
    assert r.ok and r.text == "Zoomed in on the image to the region [100, 50, 200, 150]."
    assert r.image.size == (100, 100) and r.image.getpixel((0, 0)) == (100, 50, 0)
    # second turn of the same episode: same ref, served from the replica's cache
    r2 = h.call.remote("image_zoom_in_tool", image_arg(ref), {"bbox_2d": [300, 200, 310, 210]}).result()
    # 10x10 at centre (305, 205) -> 28x28: (291, 191, 319, 219)
    assert r2.image.size == (28, 28) and r2.image.getpixel((0, 0)) == (291 - 256, 191, 16)  # x=291
    after = h.stats.remote().result()
    assert after["cache_hits"] == before["cache_hits"] + 1 and after["pid"] == before["pid"]


def test_handle_other_image_forms(tools):
    h = tools["handle"]
    args = {"bbox_2d": [10, 20, 60, 90], "label": "x"}
    for image in (ray.put(IMAGE), IMAGE, png(IMAGE)):  # bare ref (resolved by Ray), PIL, bytes
        r = h.call.remote("image_zoom_in_tool", image, args).result()
        assert r.ok and r.image.size == (50, 70) and r.image.getpixel((0, 0)) == (10, 20, 0)
        assert r.text.endswith("with label x.")


def test_handle_bad_images_are_answered(tools):
    h = tools["handle"]
    pid = h.stats.remote().result()["pid"]
    data = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    cases = {
        b"definitely not an image": "not an image",
        data[: len(data) // 2]: "truncated or corrupt",
        bomb_png(20_000, 5_000): "over the cap",  # 10^8 pixels > 64M default cap
        bomb_png(100_000, 100_000): "decompression bomb",
    }
    for payload, reason in cases.items():
        r = h.call.remote("image_zoom_in_tool", payload, {"bbox_2d": [0, 0, 50, 50]}).result()
        assert not r.ok and r.image is None and reason in r.text
    r = h.call.remote("image_zoom_in_tool", 12345, {"bbox_2d": [0, 0, 50, 50]}).result()
    assert not r.ok and "image must be" in r.text
    r = h.call.remote("no_such_tool", IMAGE, {}).result()
    assert not r.ok and r.text.startswith("Error: unknown tool")
    assert h.stats.remote().result()["pid"] == pid


def test_http_route(tools):
    url = tools["url"]
    body = {"image": base64.b64encode(png(IMAGE)).decode(), "arguments": {"bbox_2d": [100, 50, 200, 150]}}
    with httpx.Client(timeout=30) as client:
        r = client.post(f"{url}/image_zoom_in_tool", json=body)
        assert r.status_code == 200 and r.json()["ok"] and r.json()["text"].startswith("Zoomed in")
        crop = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
        assert crop.size == (100, 100) and crop.convert("RGB").getpixel((0, 0)) == (100, 50, 0)

        bad = client.post(f"{url}/image_zoom_in_tool", json={**body, "arguments": {"bbox_2d": [5, 5]}})
        assert bad.status_code == 200 and bad.json() == {
            "ok": False, "text": "Error: bbox_2d parameter is missing or not a list of 4 numbers.", "image": None}

        schemas = client.get(f"{url}/")
        assert schemas.status_code == 200
        assert [s["function"]["name"] for s in schemas.json()] == ["image_rotate_tool", "image_zoom_in_tool"]
        assert client.get(url, follow_redirects=True).json() == schemas.json()
        assert client.get(f"{url}/healthz").json() == {"status": "ok"}

        assert client.post(f"{url}/no_such_tool", json=body).status_code == 404
        assert client.post(f"{url}/image_zoom_in_tool", content=b"{not json").status_code == 400
        junk = {"image": base64.b64encode(b"GIF89a...junk").decode(), "arguments": {}}
        assert client.post(f"{url}/image_zoom_in_tool", json=junk).status_code == 400
        bomb = {"image": base64.b64encode(bomb_png(20_000, 5_000)).decode(), "arguments": {}}
        r = client.post(f"{url}/image_zoom_in_tool", json=bomb)
        assert r.status_code == 413 and "over the cap" in r.json()["text"]

        # resize: a 1000x1000 upload smart-resized to <= 50176 px is 224x224 (Qwen: multiples of 28)
        big = {"image": base64.b64encode(png(Image.new("RGB", (1000, 1000)))).decode(),
               "arguments": {"bbox_2d": [0, 0, 1000, 1000]}, "resize": {"min_pixels": 3136, "max_pixels": 50176}}
        r = client.post(f"{url}/image_zoom_in_tool", json=big)
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).size == (224, 224)


def test_token_caps_and_timeout(strict_tools):
    url, h = strict_tools["url"], strict_tools["handle"]
    small = {"image": base64.b64encode(png(coded_image(56, 56))).decode(), "arguments": {"bbox_2d": [0, 0, 28, 28]}}
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{url}/").status_code == 401
        assert client.get(f"{url}/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post(f"{url}/image_zoom_in_tool", json=small).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert client.get(f"{url}/", headers=auth).status_code == 200
        assert client.get(f"{url}/healthz").status_code == 200
        r = client.post(f"{url}/image_zoom_in_tool", content=b"x" * 100_001, headers=auth)
        assert r.status_code == 413 and "tools.max_request_bytes" in r.json()["text"]
        r = client.post(f"{url}/image_zoom_in_tool", json=small, headers=auth)
        assert r.status_code == 504 and "timed out" in r.json()["text"]
    # the handle path has no timeout of its own: the caller's (the agent loop's) is the one
    r = h.call.remote("image_zoom_in_tool", IMAGE, {"bbox_2d": [0, 0, 50, 50]}).result()
    assert r.ok and r.image.size == (50, 50)


def test_pixel_cap_and_bounded_decodes(tools):
    """Issue 12 item 4: a 4 KB PNG of 7999x7999 (64 M pixels) was decoded (+0.5 GB of RSS per
    request, 2.5 GB for 4 at once). Now it is refused from its header, and images under the cap are
    decoded at most tools.max_concurrent_decodes at a time, whatever max_ongoing_requests is."""
    from deepeyes.config import ToolsConfig

    url, auth = tools["url"], {}
    huge = base64.b64encode(png(Image.new("L", (7_999, 7_999)))).decode()
    r = httpx.post(f"{url}/image_zoom_in_tool", json={"image": huge, "arguments": {"bbox_2d": [0, 0, 50, 50]}},
                   headers=auth, timeout=60)
    assert r.status_code == 413 and "tools.max_image_pixels" in r.json()["text"], r.text
    big = base64.b64encode(png(Image.new("L", (5_000, 5_000), 90))).decode()  # 25 M pixels: accepted

    async def many():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(f"{url}/image_zoom_in_tool", headers=auth, json={
                "image": big, "arguments": {"bbox_2d": [i, i, i + 40, i + 40]}}) for i in range(6)])

    answers = asyncio.run(many())
    assert [a.status_code for a in answers] == [200] * 6 and all(a.json()["ok"] for a in answers)
    peak = tools["handle"].stats.remote().result()["decodes_peak"]
    assert peak == ToolsConfig().max_concurrent_decodes == 2, peak


# ---- 1,000 generated calls through the handle, concurrently ------------------------------------

numbers = st.one_of(st.integers(-100, 600), st.floats(-100, 600), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-10**30, 10**30), st.sampled_from([0, 27.5, 28, 30, 31, 336, 448, 10**400]))
junk = st.recursive(st.one_of(st.none(), st.booleans(), st.text(max_size=6), numbers),
                    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                    max_leaves=6)
arguments = st.one_of(
    st.fixed_dictionaries({"bbox_2d": st.lists(numbers, min_size=4, max_size=4)},
                          optional={"label": st.one_of(st.text(max_size=8), junk)}),
    st.fixed_dictionaries({"bbox_2d": st.one_of(st.lists(st.one_of(numbers, junk), max_size=6), junk)}),
    junk, st.text(max_size=30))
names = st.one_of(st.just("image_zoom_in_tool"), st.just("image_zoom_in_tool"), st.just("image_rotate_tool"), junk)
images = st.sampled_from(["ref", "ref", "ref", "bytes", "junk-bytes"])


def generate_calls(n: int) -> list[tuple]:
    calls: list[tuple] = []

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(name=names, args=arguments, image=images)
    def collect(name, args, image):
        calls.append((name, args, image))

    collect()
    return calls


def test_fuzz_1000_calls_through_the_handle(tools):
    h = tools["handle"]
    calls = generate_calls(1000)
    assert len(calls) >= 1000
    ref, data = ray.put(IMAGE), png(IMAGE)
    forms = {"ref": image_arg(ref), "bytes": data, "junk-bytes": data[:300]}
    before = h.stats.remote().result()

    async def run_all():
        out = []
        for i in range(0, len(calls), 128):  # max_ongoing_requests is 128
            batch = [h.call.remote(name, forms[image], args) for name, args, image in calls[i:i + 128]]
            out += await asyncio.gather(*batch)
        return out

    results = asyncio.run(run_all())
    after = h.stats.remote().result()
    assert (after["pid"], after["replica"]) == (before["pid"], before["replica"])  # no restart
    assert after["calls"] - before["calls"] == len(calls)
    ok = 0
    for r in results:
        if r.ok:
            ok += 1
            w, hh = r.image.size
            assert r.text.startswith(("Zoomed in", "Rotated")) and max(w, hh) / min(w, hh) < 200
        else:
            assert r.image is None and r.text.startswith("Error")
    assert 0 < ok < len(results)  # the generator reaches both outcomes
