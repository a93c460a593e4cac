"""What the viewer's browser tests share: the viewer as a server process of its own, headless
Chromium driven by selenium, and a wait with a deadline."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from raycli import REPO, free_port

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@contextlib.contextmanager
def serving(folder: Path):
    """The viewer of `folder` as a server process of its own on a free loopback port; stopped by its pid."""
    port = free_port()
    log_path = folder.parent / f"viewer-{folder.name}.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "view", str(folder), "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                urllib.request.urlopen(url + "api/run", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the viewer did not answer within 60 s"
                time.sleep(0.2)
        yield {"url": url, "port": port}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check, timeout: float = 20.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def call(box: list[float]) -> str:
    return '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": %s}}</tool_call>' % json.dumps(box)


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` byte for byte as given (no client-side normalisation of `..` or escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
