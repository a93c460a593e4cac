"""Hostile code against the sandbox's KernelPool (services/tools/sandbox/): each test runs what a
model could write and asserts the host saw nothing of it. The isolation test documents this host
(root, Linux with user/net/pid namespaces, Landlock ABI >= 4, x86_64 seccomp): it asserts every
piece is in force rather than skipping, so a host that loses one fails loudly here.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest
from PIL import Image

from services.tools.sandbox.isolation import sweep_stale_folders
from services.tools.sandbox.pool import FOLDER_RE, KernelPool, SandboxLimits

GRACE_S = 1.0
SLACK_S = 1.5  # scheduling on a loaded 2-core machine


def _stat_fields(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
    except OSError:
        return None


def processes_in_group(pgid: int) -> list[int]:
    """Pids whose process group is `pgid` (zombies included)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat_fields(pid)
        if fields and int(fields[2]) == pgid:
            out.append(int(pid))
    return out


def processes_of_uid(uid: int) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        except (OSError, StopIteration):
            continue
        if int(uids[0]) == uid:
            out.append(int(pid))
    return out


def descendants(root_pid: int) -> list[int]:
    """Every process below `root_pid` (by ppid)."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat_fields(pid)
        if fields:
            children.setdefault(int(fields[1]), []).append(int(pid))
    out, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kernel_view(pool: KernelPool, sid: str) -> dict:
    """The session's kernel as the host sees it: its uid and folder (asked inside), pid, group."""
    r = pool.execute(sid, "import os\nprint(os.getuid(), os.getcwd())", 5)
    uid, folder = r.stdout.split()
    pids = processes_of_uid(int(uid))
    assert len(pids) == 1, pids  # a root pool's kernel uid is its own
    return {"uid": int(uid), "folder": folder, "pid": pids[0], "pgid": int(_stat_fields(str(pids[0]))[2])}


def png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    limits = SandboxLimits(memory_mb=1024, max_processes=32, max_stdout_chars=8000, grace_s=GRACE_S)
    p = KernelPool(tmp_path_factory.mktemp("sandbox"), limits, spares=1, ttl_s=600)
    yield p
    p.close()


@pytest.fixture
def session(pool):
    sid = f"t-{uuid.uuid4().hex[:8]}"
    pool.create(sid, png_bytes((37, 23)))
    yield sid
    pool.release(sid)


def test_isolation_in_force_on_this_host(pool):
    iso = pool.isolation
    assert iso["user_ns"] and iso["net_ns"] and iso["pid_ns"] and iso["mount_ns"]
    assert iso["landlock"] >= 4  # 4: TCP bind/connect rules
    assert iso["seccomp"] is True
    assert os.geteuid() != 0 or iso["uid"] >= 1_000_000  # a root pool's kernels are never root


def test_tcp_connect_to_host_listener_fails(pool, session):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        code = ("import socket\ntry:\n    s = socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', %d))\n"
                "    print('CONNECTED')\nexcept OSError as e:\n    print('refused', e.errno)\n") % port
        r = pool.execute(session, code, 5)
        assert r.status == "ok", r.stderr
        assert "CONNECTED" not in r.stdout and "refused 1" in r.stdout  # EPERM: seccomp says no first
        with pytest.raises(socket.timeout):
            listener.accept()


def test_sentinel_outside_session_folder_is_unreadable(pool, session):
    token = uuid.uuid4().hex
    outside = tempfile.mkdtemp(prefix="sbx-sentinel-", dir="/tmp")
    try:
        os.chmod(outside, 0o755)
        sentinel = os.path.join(outside, "sentinel.txt")
        with open(sentinel, "w") as f:
            f.write(token)
        os.chmod(sentinel, 0o644)  # readable by any uid: only Landlock stands in the way
        r = pool.execute(session, f"print(open({sentinel!r}).read())", 5)
    finally:
        shutil.rmtree(outside)
    assert token not in r.stdout
    assert r.status == "error" and "PermissionError" in r.stderr, r.stderr
    r = pool.execute(session, "import os\nprint(sorted(os.listdir('.')))\nopen('mine.txt', 'w').write('x')", 5)
    assert r.status == "ok" and "image_1.png" in r.stdout, r.stderr  # its own folder is read-write


def test_two_gib_allocation_is_memory_and_restarts(pool, session):
    assert pool.execute(session, "keep = 41", 5).status == "ok"
    r = pool.execute(session, "x = bytearray(2 * 1024**3)", 10)
    assert r.status == "memory", (r.status, r.stderr)
    r = pool.execute(session, "print(keep)", 5)
    assert r.restarted and r.status == "error" and "NameError" in r.stderr
    r = pool.execute(session, "import numpy as np\na = np.ones(2 * 1024**3 // 8)", 10)
    assert r.status == "memory", (r.status, r.stderr)
    r = pool.execute(session, "print(image_1.size, 6 * 7)", 5)
    assert r.restarted and r.status == "ok" and r.stdout == "(37, 23) 42\n"  # image_1 bound again


def test_busy_loop_is_interrupted_and_kernel_survives(pool, session):
    info = kernel_view(pool, session)
    pool.execute(session, "kept = 'yes'", 5)
    t0 = time.monotonic()
    r = pool.execute(session, "while True: pass", 2)
    assert r.status == "timeout" and time.monotonic() - t0 < 2 + SLACK_S
    r = pool.execute(session, "print(kept)", 5)
    assert r.status == "ok" and r.stdout == "yes\n" and not r.restarted
    assert kernel_view(pool, session)["pid"] == info["pid"]


def test_loop_ignoring_signals_is_killed_with_its_group(pool, session):
    info = kernel_view(pool, session)
    assert set(processes_in_group(info["pgid"])) == {info["pgid"], info["pid"]}  # holder + kernel
    code = ("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "while True:\n    try:\n        while True: pass\n    except BaseException:\n        pass\n")
    t0 = time.monotonic()
    r = pool.execute(session, code, 2)
    elapsed = time.monotonic() - t0
    assert r.status == "timeout" and 2 <= elapsed < 2 + GRACE_S + SLACK_S, (r.status, elapsed)
    assert processes_in_group(info["pgid"]) == [] and not os.path.exists(f"/proc/{info['pid']}")
    assert processes_of_uid(info["uid"]) == []
    r = pool.execute(session, "print('fresh')", 5)
    assert r.restarted and r.stdout == "fresh\n"


def test_fork_bomb_hits_the_process_cap_and_leaves_nothing(pool, session):
    info = kernel_view(pool, session)
    code = ("import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
            "            time.sleep(60)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
            "    print('fork failed after', n, type(e).__name__)\n")
    r = pool.execute(session, code, 10)
    assert r.status == "ok" and r.stdout.startswith("fork failed after"), (r.status, r.stdout, r.stderr)
    assert int(r.stdout.split()[3]) < 32
    # The children did not outlive the cell; the kernel still works.
    assert set(processes_in_group(info["pgid"])) == {info["pgid"], info["pid"]}
    assert processes_of_uid(info["uid"]) == [info["pid"]]
    assert pool.execute(session, "print(1 + 1)", 5).stdout == "2\n"
    pool.release(session)
    assert processes_in_group(info["pgid"]) == [] and processes_of_uid(info["uid"]) == []
    assert not os.path.exists(info["folder"])


def test_cancel_kills_the_running_call(pool, session):
    results = []
    worker = threading.Thread(target=lambda: results.append(pool.execute(session, "while True: pass", 30)))
    worker.start()
    time.sleep(0.5)
    pool.cancel(session)
    worker.join(5)
    assert results and results[0].status == "killed"
    r = pool.execute(session, "print(image_1.size)", 5)
    assert r.restarted and r.stdout == "(37, 23)\n"


def test_sessions_are_separate_and_state_persists(pool):
    pool.create("A")
    pool.create("B")
    try:
        assert pool.execute("A", "x = 'from A'", 5).status == "ok"
        r = pool.execute("B", "print(x)", 5)
        assert r.status == "error" and "NameError" in r.stderr
        r = pool.execute("A", "x += '!'\nprint(x)", 5)
        assert r.status == "ok" and r.stdout == "from A!\n" and not r.restarted
        assert kernel_view(pool, "A")["uid"] != kernel_view(pool, "B")["uid"]
    finally:
        pool.release("A")
        pool.release("B")
    assert pool.execute("A", "print(x)", 5).status == "lost"


def test_figures_image_1_and_output_caps(pool, session):
    code = "print(type(image_1).__name__, image_1.size)\nimport os\nprint(os.path.exists('image_1.png'))"
    r = pool.execute(session, code, 5)
    assert r.stdout == "PngImageFile (37, 23)\nTrue\n", r.stderr
    code = "import matplotlib.pyplot as plt\nplt.figure(figsize=(4, 3), dpi=50)\nplt.plot([1, 3, 2])\nplt.show()"
    r = pool.execute(session, code, 10)
    assert r.status == "ok" and len(r.images) == 1, r.stderr
    assert Image.open(io.BytesIO(r.images[0])).size == (200, 150)
    r = pool.execute(session, "show(image_1.crop((0, 0, 10, 5)))\nplt.plot([1, 2])", 10)
    sizes = [Image.open(io.BytesIO(png)).size for png in r.images]
    assert sizes[1] == (10, 5) and len(sizes) == 2  # the open figure first, then show()
    r = pool.execute(session, "print('a' * 1_000_000)", 10)
    assert r.status == "ok" and len(r.stdout) < 8000 + 200
    assert r.stdout.startswith("a" * 8000) and "992001 more characters left out" in r.stdout


def test_create_execute_release_cycles_leave_nothing_behind(pool):
    settled = lambda: pool.stats()["spares"] == pool.spares  # noqa: E731
    assert wait_for(settled)
    before_procs = len(descendants(os.getpid()))
    before_dirs = sorted(os.listdir(pool.root))
    png = png_bytes((8, 8))
    for i in range(100):
        sid = f"cycle-{i}"
        pool.create(sid, png)
        r = pool.execute(sid, "y = image_1.size[0] * 2\nprint(y)", 5)
        assert r.status == "ok" and r.stdout == "16\n", r.stderr
        pool.release(sid)
    assert wait_for(settled)
    assert len(descendants(os.getpid())) == before_procs
    assert len(os.listdir(pool.root)) == len(before_dirs)


UNTIE = """import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
print(libc.prctl(1, 0, 0, 0, 0), ctypes.get_errno())  # untie the kernel from its holder's death
os.setsid()
if os.fork() == 0:
    time.sleep(300)
"""
DYING_POOL = """
import sys, threading, time
from services.tools.sandbox.pool import KernelPool
pool = KernelPool(sys.argv[1], spares=1)
pool.create("s")
print(pool.execute("s", sys.argv[2], 5).stdout.strip(), flush=True)
threading.Thread(target=pool.execute, args=("s", "while True: pass", 300)).start()
time.sleep(0.5)
print("ready", flush=True)
time.sleep(300)
"""


def test_kernels_die_with_their_pool(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", DYING_POOL, str(tmp_path), UNTIE], cwd=repo,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "-1 1"  # prctl(PR_SET_PDEATHSIG, 0): EPERM (seccomp)
        assert proc.stdout.readline().strip() == "ready"
        tree = descendants(proc.pid)
        assert len(tree) >= 5, tree  # the template, a holder and a kernel per kernel
    finally:
        proc.send_signal(signal.SIGKILL)  # no close(): the template must notice on its own
        proc.wait()
    alive = lambda: [p for p in tree if (_stat_fields(str(p)) or ["Z"])[0] != "Z"]  # noqa: E731
    assert wait_for(lambda: not alive(), 5.0), alive()


def test_stale_folders_of_dead_pools_are_swept(tmp_path):
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)  # a pid that is dead now
    stale = tmp_path / f"deepeyes-sbx-{child}-abc123"
    stale.mkdir()
    live = tmp_path / f"deepeyes-sbx-{os.getppid()}-abc123"
    live.mkdir()
    assert sweep_stale_folders(tmp_path, FOLDER_RE) == 1
    assert not stale.exists() and live.exists()
