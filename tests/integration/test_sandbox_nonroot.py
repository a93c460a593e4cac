"""The sandbox's non-root pool path (a replica that is not root: the user namespace comes first).

This machine runs the suite as root, so the pool here runs inside `unshare --user --map-user=1000`:
its euid is 1000 and it takes the non-root branch of services/tools/sandbox/ (its own user
namespace before the network, pid, mount and IPC ones; no uid switch per kernel). What this does
NOT show: file permissions of a real unprivileged account (uid 1000 here is root outside, so files
owned by root are its own). The kernel's process cap still leaves it room: RLIMIT_NPROC is counted
per user namespace (Linux 5.14+), and each kernel has its own, so a thread and a subprocess start.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from services.tools.sandbox.pool import KernelPool, SandboxLimits
    root, sentinel, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = {"euid": os.geteuid()}
    pool = KernelPool(root, SandboxLimits(memory_mb=1024, max_processes=32, grace_s=1.0), spares=0, ttl_s=600)
    out["isolation"] = pool.isolation
    pool.create("a"); pool.create("b")
    out["state"] = [pool.execute("a", "x = 41", 5).status, pool.execute("a", "print(x + 1)", 5).stdout.strip(),
                    pool.execute("b", "print('x' in dir())", 5).stdout.strip()]
    out["uid_inside"] = pool.execute("a", "import os; print(os.getuid())", 5).stdout.strip()
    out["spawn"] = pool.execute("a", "import subprocess, threading\\nt = threading.Thread(target=print)\\n"
                                "t.start(); t.join()\\nprint(subprocess.run(['true']).returncode)", 5).stdout.strip()
    out["read"] = pool.execute("a", f"print(open({sentinel!r}).read())", 5).stderr[-200:]
    code = ("import socket\\ntry:\\n    s = socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', %d))\\n"
            "    print('CONNECTED')\\nexcept OSError as e:\\n    print('refused', e.errno)\\n") % port
    out["connect"] = pool.execute("a", code, 5).stdout.strip()
    t = time.monotonic()
    r = pool.execute("b", "import signal\\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\\nwhile True: pass", 2)
    out["loop"] = [r.status, round(time.monotonic() - t, 1)]
    out["after_kill"] = pool.execute("b", "print(1 + 1)", 5).stdout.strip()
    pool.release("a"); pool.release("b")
    out["stats"] = {k: v for k, v in pool.stats().items() if isinstance(v, (int, float, str, bool))}
    pool.close()
    print("RESULT " + json.dumps(out))
""")


def test_a_non_root_pool_confines_its_kernels(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("SECRET-SENTINEL")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        proc = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-c",
                               SCRIPT, str(tmp_path / "pool"), str(sentinel), str(listener.getsockname()[1])],
                              capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert out["euid"] == 1000  # the pool took the non-root branch
    iso = out["isolation"]
    assert iso["user_ns"] and iso["net_ns"] and iso["pid_ns"] and iso["mount_ns"], iso
    assert iso["landlock"] >= 4 and iso["seccomp"] is True, iso
    assert out["state"] == ["ok", "42", "False"]  # state kept per trajectory, never shared
    assert out["spawn"] == "0"  # a thread (prints an empty line) and a subprocess ran in the kernel
    assert out["uid_inside"] == "1000"  # no uid switch without root: the pool's own uid
    assert "SECRET-SENTINEL" not in out["read"] and "PermissionError" in out["read"]
    assert out["connect"] == "refused 1"  # EPERM from seccomp
    assert out["loop"][0] == "timeout" and out["loop"][1] < 2 + 1.0 + 3.0  # timeout, grace, slack
    assert out["after_kill"] == "2"  # a fresh kernel took the killed one's place
    assert out["stats"]["kills"] == 1 and out["stats"]["kernels"] == 0 and out["stats"]["sessions"] == 0
