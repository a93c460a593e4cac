"""`KernelPool`: one sandboxed, stateful Python kernel per session, supervised (pure Python, no Ray).

Invariant: every kernel has one owner (a session or the spare list), a deadline on every read
from it, and a sweep; a kernel that misbehaved (ignored its timeout's SIGINT, ran out of memory,
died, was cancelled) is killed with its whole pid namespace and never reused: the session's next
`execute` runs on a fresh kernel and says so (`restarted=True`).

- Kernels are forks of one template process (kernel.py), so a kernel costs tens of ms; `spares`
  of them wait, already confined (isolation.py), refilled by a background thread.
- Timeout: SIGINT (KeyboardInterrupt in user code: the kernel keeps its variables), then after
  `grace_s` SIGKILL of the kernel, pid 1 of its namespace, which takes every process inside with
  it (no pid namespace: the process group). The kill is complete when the holder's pidfd fires.
- A root pool runs kernel slot n as uid UID_BASE + ((pid % 1024) * 64 + pool number) * MAX_KERNELS
  + n, its folder chowned to it, so RLIMIT_NPROC counts that kernel alone.
- Folders are `<root>/deepeyes-sbx-<pool pid>-<kernel id>`; those of dead pools are swept at start
  (`isolation.sweep_stale_folders`); `sweep()` releases sessions idle past `ttl_s`.
- Thread-safe: calls of one session are serialized; `cancel` and `release` kill without waiting.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.tools.sandbox import isolation
from services.tools.sandbox.kernel import FRAME, Template, encode_frame, ready_fds

FOLDER_PREFIX = "deepeyes-sbx-"
FOLDER_RE = re.compile(r"^deepeyes-sbx-(\d+)-([0-9a-z]+)$")
UID_BASE, MAX_KERNELS = 1_000_000, 1024   # a root pool's kernel uids; kernels alive at once
POOL_NUMBERS = itertools.count()          # pools of one process get distinct uids and folders
KERNEL_START_S = 30.0      # fork to hello
BIND_S = 30.0              # loading image_1
KILL_WAIT_S = 5.0          # SIGKILL to the holder's exit (the namespace empty)
REFILL_CHECK_S = 5.0       # the refill thread also wakes this often (a failed start is retried)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TIMEOUT_KEPT = "TimeoutError: the code ran past the {t:g} s limit and was interrupted; variables are kept."
TIMEOUT_KILLED = ("TimeoutError: the code ran past the {t:g} s limit and did not stop when interrupted; "
                  "it was killed and the kernel restarted, so earlier variables are gone.")
MEMORY_NOTE = "The kernel went over its {mb} MB memory limit and was restarted, so earlier variables are gone."
LOST_NOTE = "The kernel was lost ({why}) and was restarted, so earlier variables are gone."
KILLED_NOTE = "The call was cancelled; the kernel was stopped and restarted, so earlier variables are gone."
NO_SESSION = "No kernel session {sid!r}: it was released, expired after {ttl:g} s idle, or never created."


@dataclass
class SandboxLimits:
    """What one kernel may use; enforced inside the kernel (rlimits) and by the pool (caps)."""

    memory_mb: int = 1024          # RLIMIT_AS of the kernel
    cpu_s: int = 60                # RLIMIT_CPU (the kernel's lifetime CPU)
    max_processes: int = 32        # RLIMIT_NPROC: the fork bomb cap (per kernel uid under a root pool)
    max_open_files: int = 256      # RLIMIT_NOFILE
    max_file_mb: int = 64          # RLIMIT_FSIZE
    max_stdout_chars: int = 8000   # each of stdout / stderr, truncated with a note
    max_images: int = 10           # images per call (figures first, then show())
    max_image_pixels: int = 4_000_000  # per image; bigger ones are downscaled, with a note
    grace_s: float = 1.0           # after SIGINT, before SIGKILL of the whole namespace


@dataclass
class ExecResult:
    """One call's outcome. status: ok | error (traceback in stderr) | timeout | memory | lost | killed."""

    status: str
    stdout: str
    stderr: str
    images: list[bytes]    # PNG bytes
    duration_s: float
    restarted: bool        # this call ran on a fresh kernel: the session's earlier state is gone


class _Gone(Exception):
    """The kernel died, closed its pipe or broke the protocol."""


class _Late(Exception):
    """The deadline passed before the kernel answered."""


class _Kernel(isolation.ConfinedProcess):
    """One kernel as the pool sees it: the process (holder, pid), its pipes, folder and uid slot."""

    def __init__(self, folder: Path, slot: int, uid: int | None, holder: tuple[int, int], req: int, resp: int) -> None:
        super().__init__(*holder)
        self.folder, self.slot, self.uid, self.req, self.resp = folder, slot, uid, req, resp
        self.isolation: dict[str, Any] = {}
        self.cancelled, self.closed, self.buf = False, False, bytearray()
        os.set_blocking(req, False)

    def send(self, obj: dict[str, Any], deadline: float) -> None:
        data = memoryview(encode_frame(obj))
        while data:
            try:
                data = data[os.write(self.req, data):]
            except BlockingIOError:
                if not ready_fds([self.req], deadline - time.monotonic(), select.POLLOUT):
                    raise _Late from None
            except OSError as e:  # EPIPE: the kernel is gone
                raise _Gone(str(e)) from None

    def receive(self, deadline: float, max_bytes: int) -> dict[str, Any]:
        """The next frame, read with a deadline; a partial frame stays buffered for the next try."""
        while True:
            n = FRAME.unpack_from(self.buf)[0] if len(self.buf) >= FRAME.size else -1
            if n > max_bytes:
                raise _Gone(f"a frame of {n} bytes (at most {max_bytes})")
            if 0 <= n <= len(self.buf) - FRAME.size:
                body = bytes(self.buf[FRAME.size:FRAME.size + n])
                del self.buf[:FRAME.size + n]
                with contextlib.suppress(ValueError):
                    if isinstance(msg := json.loads(body), dict):
                        return msg
                raise _Gone("a frame that is not a JSON object")
            if deadline <= time.monotonic():
                raise _Late
            ready = ready_fds([self.resp, self.pidfd], deadline - time.monotonic())
            if self.resp in ready:
                chunk = os.read(self.resp, 1 << 20)
                if not chunk:
                    raise _Gone("its pipe closed")
                self.buf += chunk
            elif ready:
                raise _Gone("its process exited")

    def close(self) -> None:
        with self.kill_lock:
            if not self.closed:
                self.closed = True
                for fd in (self.req, self.resp, self.pidfd):
                    os.close(fd)


@dataclass
class _Session:
    image_png: bytes | None
    kernel: _Kernel | None = None
    last_used: float = field(default_factory=time.monotonic)
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class KernelPool:
    """Sessions -> kernels, warm spares, deadlines and kills (see the module docstring).

    Args:
        root: where session folders live.
        limits: per-kernel limits (None: the defaults).
        spares: kernels kept started and confined, waiting for `create`.
        ttl_s: `sweep()` releases sessions idle longer than this.
        isolate: namespaces, uid drop, Landlock and seccomp (False: process group and rlimits only).

    Attributes:
        isolation: what is in force on this host, as the first kernel reported it: user_ns,
            mount_ns, net_ns, pid_ns (bools), landlock (ABI, 0 if none), seccomp (bool), uid (the
            first kernel's; a root pool gives each kernel its own).
    """

    def __init__(self, root: str | Path, limits: SandboxLimits | None = None, *, spares: int = 1,
                 ttl_s: float = 900.0, isolate: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits or SandboxLimits()
        self.spares, self.ttl_s, self.isolate = max(0, int(spares)), float(ttl_s), isolate
        number = next(POOL_NUMBERS)
        block = (os.getpid() % 1024) * 64 + number % 64
        self._uid_base = UID_BASE + block * MAX_KERNELS if os.geteuid() == 0 and isolate else None
        self._max_frame = (1 << 20) + 12 * self.limits.max_stdout_chars + self.limits.max_images * (
            6 * self.limits.max_image_pixels + (1 << 16))  # base64 of worst-case RGBA PNGs, JSON-escaped text
        self._lock, self._wake = threading.Lock(), threading.Event()
        self._sessions: dict[str, _Session] = {}
        self._spare_kernels: list[_Kernel] = []
        self._slots: set[int] = set()
        self._counts = {"kills": 0, "timeouts": 0, "restarts": 0, "kernel_starts": 0}
        self._start_s_last = self._start_s_sum = 0.0
        self._req_id, self._closed, self._broken = 0, False, None
        self.swept_stale = isolation.sweep_stale_folders(self.root, FOLDER_RE)
        self._template = Template(self.root / f"{FOLDER_PREFIX}{os.getpid()}-template{number}")
        self._template.folder.mkdir(exist_ok=True)
        try:
            self._template.start()
            probe = self._spawn()
        except BaseException:
            self._template.stop()
            shutil.rmtree(self._template.folder, ignore_errors=True)
            raise
        self.isolation = {k: probe.isolation.get(k) for k in ("user_ns", "mount_ns", "net_ns", "pid_ns",
                                                                "landlock", "seccomp", "uid")}
        if self.spares:
            self._spare_kernels.append(probe)
        else:
            self._destroy(probe)
        self._refiller = threading.Thread(target=self._refill, name="kernel-pool-refill", daemon=True)
        self._refiller.start()

    def _spawn(self) -> _Kernel:
        """Start one confined kernel (a fork of the template) and wait for its hello."""
        t0 = time.monotonic()
        with self._lock:
            slot = min(set(range(len(self._slots) + 1)) - self._slots)
            if slot >= MAX_KERNELS:
                raise RuntimeError(f"{MAX_KERNELS} kernels alive in one pool; release sessions or add replicas")
            self._slots.add(slot)
        folder = self.root / f"{FOLDER_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"  # the kernel's id
        uid = None if self._uid_base is None else self._uid_base + slot
        spec = {"folder": str(folder), "uid": uid, "as_root": os.geteuid() == 0, "isolate": self.isolate,
                "limits": asdict(self.limits)}
        pipes = os.pipe() + os.pipe()  # request r/w, reply r/w
        try:
            folder.mkdir(mode=0o700)
            if uid is not None:
                os.chown(folder, uid, uid)
            holder = self._template.spawn(spec, [pipes[0], pipes[3]])
        except BaseException:
            for fd in pipes:
                os.close(fd)
            shutil.rmtree(folder, ignore_errors=True)
            with self._lock:
                self._slots.discard(slot)
            raise
        os.close(pipes[0])  # the kernel holds these ends now; ours would hide its death
        os.close(pipes[3])
        k = _Kernel(folder, slot, uid, holder, pipes[1], pipes[2])
        try:
            hello = k.receive(time.monotonic() + KERNEL_START_S, 1 << 20)
            if hello.get("op") != "hello" or "error" in hello:
                raise _Gone(str(hello.get("error", hello)))
            k.pid, k.isolation = int(hello["pid"]), dict(hello["isolation"])
            k.pid_ns = bool(k.isolation.get("pid_ns"))
        except (_Gone, _Late, KeyError, TypeError, ValueError) as e:
            log = folder / "kernel.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            self._destroy(k)
            raise RuntimeError(f"a sandbox kernel did not start ({type(e).__name__}: {e}); "
                               f"its log ends:\n{tail}") from None
        with self._lock:
            self._counts["kernel_starts"] += 1
            self._start_s_last = time.monotonic() - t0
            self._start_s_sum += self._start_s_last
        return k

    def _destroy(self, k: _Kernel) -> None:
        """Kill, close, remove the folder; the uid slot is reused only once the kill is confirmed."""
        gone = k.kill(KILL_WAIT_S)
        k.close()
        shutil.rmtree(k.folder, ignore_errors=True)
        if gone:
            with self._lock:
                self._slots.discard(k.slot)

    def _kill(self, k: _Kernel) -> None:
        """Kill a kernel that misbehaved or was cancelled (counted once; a release is not a kill)."""
        with self._lock:
            self._counts["kills"] += not k.killed
        k.kill(KILL_WAIT_S)

    def _start_for(self, s: _Session) -> _Kernel:
        """A kernel for `s` (a live spare if any, else a new one) with image_1 bound."""
        while True:
            with self._lock:
                k = self._spare_kernels.pop(0) if self._spare_kernels else None
            self._wake.set()
            k = k or self._spawn()
            if k.alive():
                break
            self._destroy(k)
        try:
            if s.image_png is not None:
                path = k.folder / "image_1.png"
                path.write_bytes(s.image_png)
                if k.uid is not None:
                    os.chown(path, k.uid, k.uid)
                deadline = time.monotonic() + BIND_S
                k.send({"op": "bind", "id": 0, "path": path.name}, deadline)
                reply = k.receive(deadline, 1 << 20)
                if reply.get("status") != "ok":
                    raise ValueError(f"image_png is not an image PIL can open ({str(reply.get('stderr'))[:300]}); "
                                     f"pass the PNG bytes of the episode's image")
        except (_Gone, _Late) as e:
            self._destroy(k)
            raise RuntimeError(f"the sandbox kernel did not load image_1 ({type(e).__name__}: {e})") from None
        except BaseException:
            self._destroy(k)
            raise
        return k

    def _refill(self) -> None:
        """Keep `spares` warm kernels (woken when one is taken, else every REFILL_CHECK_S: retries)."""
        while True:
            self._wake.wait(REFILL_CHECK_S)
            self._wake.clear()
            with self._lock:
                if self._closed:
                    return
                need = self.spares - len(self._spare_kernels)  # a dead spare is dropped when taken
            for _ in range(need):
                try:
                    k = self._spawn()
                except Exception as e:  # stats()["broken"] says why; retried at the next wake
                    with self._lock:
                        self._broken = f"{type(e).__name__}: {e}"
                    break
                with self._lock:
                    self._broken, closed = None, self._closed
                    if not closed:
                        self._spare_kernels.append(k)
                if closed:
                    self._destroy(k)
                    return

    def create(self, session_id: str, image_png: bytes | None = None) -> None:
        """Bind a kernel (a warm spare if any) to a new session; `image_png` becomes `image_1`.

        Raises:
            ValueError: the session exists already, or `image_png` is not an image PIL can open.
            RuntimeError: the pool is closed, or no kernel could start (the message says why).
        """
        s = _Session(image_png)
        with self._lock:
            if self._closed:
                raise RuntimeError("the kernel pool is closed")
            if session_id in self._sessions:
                raise ValueError(f"session {session_id!r} exists already; release it first")
            self._sessions[session_id] = s
        try:
            with s.lock:
                s.kernel = self._start_for(s)
        except BaseException:
            with self._lock:
                self._sessions.pop(session_id, None)
            raise

    def execute(self, session_id: str, code: str, timeout_s: float) -> ExecResult:
        """Run `code` in the session's kernel; never raises for anything the code does.

        When the previous kernel was lost (timed out past its grace, ran out of memory, died, was
        cancelled), the first call on its replacement says `restarted=True`; the call that lost
        it says so in its stderr.
        """
        with self._lock:
            s = self._sessions.get(session_id)
        no_session = ExecResult("lost", "", NO_SESSION.format(sid=session_id, ttl=self.ttl_s), [], 0.0, False)
        if s is None:
            return no_session
        with s.lock:
            t0 = time.monotonic()
            if s.released:
                return no_session
            k, restarted = s.kernel, False
            if k is None or k.killed or not k.alive():
                if k is not None:
                    self._destroy(k)
                    s.kernel = None
                try:
                    s.kernel = k = self._start_for(s)
                except Exception as e:
                    return ExecResult("lost", "", LOST_NOTE.format(why=f"no new kernel could start: {e}"), [],
                                      time.monotonic() - t0, False)
                restarted = True
                with self._lock:
                    self._counts["restarts"] += 1
            result = self._run(k, code, float(timeout_s), t0)
            result.restarted = restarted
            if k.killed:
                self._destroy(k)
                s.kernel = None
            s.last_used = time.monotonic()
            return result

    def _run(self, k: _Kernel, code: str, timeout_s: float, t0: float) -> ExecResult:
        """One exec request: its deadline, then SIGINT, the grace period and the kill."""
        with self._lock:
            self._req_id += 1
            req_id = self._req_id
        try:
            try:
                k.send({"op": "exec", "id": req_id, "code": code}, t0 + timeout_s)
                reply = k.receive(t0 + timeout_s, self._max_frame)
            except _Late:
                with self._lock:
                    self._counts["timeouts"] += 1
                k.send_signal(signal.SIGINT)
                try:
                    reply = k.receive(time.monotonic() + self.limits.grace_s, self._max_frame)
                except (_Late, _Gone):
                    self._kill(k)
                    text = TIMEOUT_KILLED.format(t=timeout_s)
                    return ExecResult("timeout", "", text, [], time.monotonic() - t0, False)
                if reply.get("status") == "interrupted":
                    res = self._result(reply, req_id, t0)
                    res.status, res.images = "timeout", []
                    res.stderr += ("\n" if res.stderr else "") + TIMEOUT_KEPT.format(t=timeout_s)
                    return res
            res = self._result(reply, req_id, t0)
        except _Gone as e:
            self._kill(k)
            why = f"{e}: it crashed, hit its CPU limit or broke the protocol"
            text = KILLED_NOTE if k.cancelled else LOST_NOTE.format(why=why)
            return ExecResult("killed" if k.cancelled else "lost", "", text, [], time.monotonic() - t0, False)
        if res.status == "memory":
            self._kill(k)  # a MemoryError may have left the kernel's own state broken
            res.stderr += ("\n" if res.stderr else "") + MEMORY_NOTE.format(mb=self.limits.memory_mb)
        return res

    def _result(self, reply: dict[str, Any], req_id: int, t0: float) -> ExecResult:
        """A reply, checked (the kernel is untrusted once user code ran), as an ExecResult."""
        status = reply.get("status")
        if reply.get("id") != req_id or status not in ("ok", "error", "memory", "interrupted"):
            raise _Gone(f"a reply that breaks the protocol (id {reply.get('id')!r}, status {status!r})")
        cap = self.limits.max_stdout_chars + 200  # the kernel's truncation note included
        texts = [t if isinstance(t := reply.get(key), str) else "" for key in ("stdout", "stderr")]
        texts = [t if len(t) <= cap else t[:cap] + "\n[... output capped]" for t in texts]
        images = []
        raw = reply.get("images")
        for item in (raw if isinstance(raw, list) else [])[:self.limits.max_images]:
            try:
                png = base64.b64decode(item, validate=True)
            except (binascii.Error, TypeError, ValueError):
                continue
            if png.startswith(PNG_MAGIC):
                images.append(png)
        status = "error" if status == "interrupted" else status  # a KeyboardInterrupt of the code's own
        return ExecResult(status, texts[0], texts[1], images, time.monotonic() - t0, False)

    def cancel(self, session_id: str) -> None:
        """Kill the session's kernel now (the caller gave up on a call); the next execute restarts."""
        with self._lock:
            s = self._sessions.get(session_id)
            k = s.kernel if s else None
        if k is not None and not k.killed:
            k.cancelled = True
            self._kill(k)

    def release(self, session_id: str) -> None:
        """Kill the session's kernel (a running call ends at once), remove its folder; idempotent."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            return
        s.released = True
        if s.kernel is not None:
            s.kernel.kill(KILL_WAIT_S)
        with s.lock:
            if s.kernel is not None:
                self._destroy(s.kernel)
                s.kernel = None

    def sweep(self) -> int:
        """Release the sessions idle longer than ttl_s (none with a call running); returns how many."""
        now = time.monotonic()
        with self._lock:
            idle = [sid for sid, s in self._sessions.items()
                    if now - s.last_used > self.ttl_s and not s.lock.locked()]
        for sid in idle:
            self.release(sid)
        return len(idle)

    def close(self) -> None:
        """Release every session and spare, stop the template; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sids, spares, self._spare_kernels = list(self._sessions), self._spare_kernels, []
        self._wake.set()
        self._refiller.join(2 * KERNEL_START_S)
        for sid in sids:
            self.release(sid)
        for k in spares:
            self._destroy(k)
        self._template.stop()
        shutil.rmtree(self._template.folder, ignore_errors=True)

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and health (`broken`: why the last kernel start failed, else None)."""
        with self._lock:
            bound = sum(1 for s in self._sessions.values() if s.kernel is not None)
            starts = self._counts["kernel_starts"]
            return {"kernels": bound + len(self._spare_kernels), "sessions": len(self._sessions),
                    "spares": len(self._spare_kernels), **self._counts, "kernel_start_s_last": self._start_s_last,
                    "kernel_start_s_mean": self._start_s_sum / starts if starts else 0.0,
                    "template_start_s": self._template.start_s, "broken": self._broken}
