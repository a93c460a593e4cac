"""The process side of the sandbox: a template that forks kernels, and the kernel's request loop.

`python -m services.tools.sandbox.kernel --ctrl-fd N` starts the template (`Template` is the
pool's handle on it): it imports numpy, PIL and matplotlib (Agg) once and warms the fonts, then
forks one process tree per spawn request (SOCK_SEQPACKET control socket; the kernel's pipe ends
come with SCM_RIGHTS), so a kernel costs a fork (20-70 ms), not a Python start with those
imports (0.8-1.7 s on a 2-core machine, idle to loaded):

    pool -- template (root when the pool is) -- holder (own session = process group; unshares
            the namespaces; waits) -- kernel (pid 1 of its pid namespace; `isolation.confine`,
            then serves requests)

Decisions:
- The holder exists because a new pid namespace applies to children only; it stays outside and
  exits only once the kernel, and so every process of the namespace, is gone: the pool waits on
  the holder's pidfd (the template sends it back) to know a kill is complete.
- Protocol: length-prefixed JSON frames on a dedicated pipe pair, never stdout; fd 1 and 2 go to
  kernel.log in the session folder, so C-level writes cannot break it. Requests: `bind` (load
  image_1.png as `image_1`) and `exec`; each reply carries its request's id.
- SIGINT raises KeyboardInterrupt while user code runs (status "interrupted"), or as it starts
  when the SIGINT came after the request was read; after the code (replying, idle) it is dropped,
  so a late interrupt cannot corrupt a reply or hit the next call.
- Processes a cell started do not outlive it: before replying, the kernel (pid 1) kills and reaps
  every other process of its namespace.
- Images: figures still open after the cell (or flushed by `plt.show()`) first, then what was
  passed to `show()` (or `Image.show()`); at most max_images, each under max_image_pixels
  (downscaled; a figure rendered at a lower dpi); what is left out is noted in stderr.
- The last expression of a cell is printed (its repr), as in a notebook; a PIL image is shown.
"""

from __future__ import annotations

import ast
import base64
import builtins
import contextlib
import io
import json
import linecache
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from services.tools.sandbox import isolation

FRAME = struct.Struct(">I")      # each frame: 4-byte big-endian length, then UTF-8 JSON
MAX_REQUEST_BYTES = 64 << 20     # a request (code) larger than this closes the kernel
LOG_NAME = "kernel.log"          # fd 1 and 2 of the kernel, in its session folder
KERNEL_PATH = "/usr/local/bin:/usr/bin:/bin"
TEMPLATE_START_S = 120.0         # the template's cold start (imports) on a loaded machine
CONTROL_S = 10.0                 # one spawn request
STOP_S = 5.0                     # the template's exit once its socket is closed


def encode_frame(obj: dict[str, Any]) -> bytes:
    """One protocol frame: the JSON of `obj` behind its length."""
    body = json.dumps(obj).encode()
    return FRAME.pack(len(body)) + body


def ready_fds(fds: list[int], timeout_s: float, events: int = select.POLLIN) -> list[int]:
    """The fds of `fds` ready within `timeout_s` (poll: select() fails on fd numbers >= 1024)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, events)
    return [fd for fd, _ in poller.poll(max(0.0, timeout_s) * 1000)]


def _read_exact(fd: int, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def read_frame(fd: int) -> dict[str, Any] | None:
    """The next frame on `fd` (blocking), None at end of file or on an oversized frame."""
    head = _read_exact(fd, FRAME.size)
    if head is None or FRAME.unpack(head)[0] > MAX_REQUEST_BYTES:
        return None
    body = _read_exact(fd, FRAME.unpack(head)[0])
    return None if body is None else json.loads(body)


def write_frame(fd: int, obj: dict[str, Any]) -> None:
    """Write one frame to `fd` in full (blocking)."""
    data = memoryview(encode_frame(obj))
    while data:
        data = data[os.write(fd, data):]


def preload() -> dict[str, Any]:
    """Import what every kernel uses, once, in the template; returns the modules it needs. Not at
    the top: the pool imports this module for the protocol and must not pay for numpy and matplotlib.
    """
    import matplotlib  # see the docstring (template only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # see the docstring (template only)
    import numpy as np  # see the docstring (template only)
    from PIL import Image  # see the docstring (template only)

    Image.init()  # every image plugin, so that no kernel reads plugin files later
    fig = plt.figure(figsize=(1, 1))
    fig.text(0.5, 0.5, "warm")  # loads the default font and the Agg renderer
    fig.savefig(io.BytesIO(), format="png")
    plt.close("all")
    return {"np": np, "plt": plt, "Image": Image, "Figure": matplotlib.figure.Figure}


def serve_template(ctrl_fd: int) -> None:
    """The template's loop: one holder per spawn request, until the pool closes the socket."""
    ctrl = socket.socket(fileno=ctrl_fd)
    mods = preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # exited holders are reaped at once, never zombies
    holders: set[int] = set()                      # pidfds of the live holders
    ctrl.send(json.dumps({"op": "ready"}).encode())
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(ctrl, 1 << 16, 4)
        except OSError:
            break
        if not msg:
            break  # the pool is gone (closed, or died): take every kernel with it
        spec = json.loads(msg)
        for pidfd in ready_fds(list(holders), 0):  # holders that exited
            holders.discard(pidfd)
            os.close(pidfd)
        template_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:  # the host is out of processes or memory: the pool reports it
            pid, error = -1, f"fork: {e}"
        if pid == 0:
            run_holder(spec, fds, template_pid, mods)
        for fd in fds:
            os.close(fd)
        if pid < 0:
            ctrl.send(json.dumps({"error": error}).encode())
            continue
        try:
            pidfd = [os.pidfd_open(pid)]
        except OSError:  # it died already (and was reaped): no pidfd, and the pool gives up on it
            pidfd = []
        holders.update(pidfd)
        socket.send_fds(ctrl, [json.dumps({"pid": pid}).encode()], pidfd)
    for pidfd in holders:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def run_holder(spec: dict[str, Any], fds: list[int], template_pid: int, mods: dict[str, Any]) -> None:
    """The holder: own session, namespaces, then fork the kernel and wait for it. Never returns."""
    code = 70
    try:
        req_fd, resp_fd = fds
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # SIGINT is for the kernel (which sets its own)
        isolation.set_parent_death_signal()
        if os.getppid() != template_pid:
            return
        isolation.close_fds_except({0, 1, 2, req_fd, resp_fd})
        os.chdir(spec["folder"])
        ns = isolation.enter_namespaces(spec["as_root"]) if spec["isolate"] else {}
        pid = os.fork()
        if pid == 0:
            run_kernel(spec, req_fd, resp_fd, ns, mods)
        os.close(req_fd)
        os.close(resp_fd)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        code = code if code >= 0 else 128 - code  # killed by a signal: 128 + its number, as a shell says
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def kernel_env(folder: str) -> dict[str, str]:
    """The whole environment of the template and of each kernel: nothing of the pool's (no secrets)."""
    return {"PATH": KERNEL_PATH, "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8",
            "MPLCONFIGDIR": os.path.join(folder, ".matplotlib"), "MPLBACKEND": "Agg",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_kernel(spec: dict[str, Any], req_fd: int, resp_fd: int, ns: dict[str, bool], mods: dict[str, Any]) -> None:
    """The kernel: confine itself, say hello (host pid, isolation in force), serve. Never returns."""
    code = 71
    try:
        isolation.set_parent_death_signal()
        host_pid = int(os.readlink("/proc/self"))  # before a fresh /proc shows pid 1 only
        folder = spec["folder"]
        for fd, path, flags in ((0, "/dev/null", os.O_RDONLY), (1, os.path.join(folder, LOG_NAME), os.O_WRONLY)):
            opened = os.open(path, flags | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        os.dup2(1, 2)
        os.environ.clear()
        os.environ.update(kernel_env(folder))
        tempfile.tempdir = folder
        try:
            info = isolation.confine(folder, spec["uid"], spec["limits"], ns, spec["isolate"])
        except OSError as e:
            write_frame(resp_fd, {"op": "hello", "error": f"{type(e).__name__}: {e}"})
            raise
        random.seed()             # forked from one template: each kernel its own random state
        mods["np"].random.seed()
        CellRunner(spec["limits"], mods).serve(req_fd, resp_fd, {"op": "hello", "pid": host_pid, "isolation": info})
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


class CappedText(io.StringIO):
    """sys.stdout/sys.stderr of a cell: keeps the first `cap` characters, counts the rest."""

    encoding = "utf-8"

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap, self.total = cap, 0

    def write(self, s: str) -> int:
        self.total += len(s)
        super().write(s[:max(0, self.cap - self.tell())])
        return len(s)

    def text(self) -> str:
        left_out = self.total - self.tell()
        note = f"\n[... {left_out} more characters left out: the output is capped at {self.cap}]"
        return self.getvalue() + (note if left_out > 0 else "")


class CellRunner:
    """A persistent namespace and the cells run in it (one per kernel, so one per session)."""

    def __init__(self, limits: dict[str, int], mods: dict[str, Any]) -> None:
        self.limits, self.np, self.plt = limits, mods["np"], mods["plt"]
        self.Image, self.Figure = mods["Image"], mods["Figure"]
        self.ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins, "show": self.show}
        self.figures: list[bytes] = []
        self.shown: list[Any] = []
        self.notes: list[str] = []
        self.cells = 0
        self.phase, self.interrupted = "idle", False  # phase: idle | before | running | after (the code)
        self.plt.show = lambda *args, **kwargs: self.flush_figures()
        self.Image.Image.show = lambda img, *args, **kwargs: self.show(img)

    def on_sigint(self, signum: int, frame: Any) -> None:
        if self.phase in ("before", "running"):
            self.interrupted = True
        if self.phase == "running":
            raise KeyboardInterrupt

    def serve(self, req_fd: int, resp_fd: int, hello: dict[str, Any]) -> None:
        """Say hello, then answer requests until the pool closes the pipe."""
        write_frame(resp_fd, hello)
        while True:
            signal.signal(signal.SIGINT, self.on_sigint)  # user code may have replaced it
            self.phase = "idle"
            req = read_frame(req_fd)
            if req is None:
                return
            self.phase, self.interrupted = "before", False
            try:
                if req.get("op") == "bind":
                    reply = self.bind(req["path"])
                else:
                    reply = self.run_cell(str(req.get("code", "")))
            except KeyboardInterrupt:  # landed between the cell's end and its bookkeeping
                self.phase = "after"
                reply = {"status": "interrupted", "stdout": "", "stderr": "", "images": []}
            reply["id"] = req.get("id")
            self.reap_leftovers()
            write_frame(resp_fd, reply)

    def reap_leftovers(self) -> None:
        """Kill and reap every other process of this pid namespace (only as its pid 1)."""
        if os.getpid() != 1:
            return  # without a pid namespace kill(-1) would reach beyond this kernel
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return

    def bind(self, path: str) -> dict[str, Any]:
        """Load the session's image as `image_1` (stored as PNG under the same name)."""
        try:
            img = self.Image.open(path)
            img.load()
            if img.format != "PNG":
                img.save(path, format="PNG")
        except Exception as e:
            return {"status": "error", "stdout": "", "stderr": f"{type(e).__name__}: {e}", "images": []}
        self.ns["image_1"] = img
        return {"status": "ok", "stdout": "", "stderr": "", "images": []}

    def _format(self, e: BaseException) -> str:
        if isinstance(e, SyntaxError):  # raised in ast.parse: its frames are not the model's code
            return "".join(traceback.format_exception_only(type(e), e))
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # the kernel's own frames say nothing to the model
        return "".join(traceback.format_exception(type(e), e, tb))

    def _exec(self, code: str, name: str) -> None:
        tree = ast.parse(code, name, "exec")
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # source lines in tracebacks
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, name, "exec"), self.ns)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), name, "eval"), self.ns)
            if isinstance(value, self.Image.Image):
                self.show(value)
            elif value is not None and not isinstance(value, self.Figure):
                print(repr(value))

    def run_cell(self, code: str) -> dict[str, Any]:
        """Run one cell; status ok | error | memory | interrupted, capped outputs, images."""
        cap = int(self.limits["max_stdout_chars"])
        out, err = CappedText(cap), CappedText(cap)
        self.figures, self.shown, self.notes = [], [], []
        self.cells += 1
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        status = "ok"
        try:
            self.phase = "running"
            if self.interrupted:
                raise KeyboardInterrupt  # the deadline passed before the code could start
            self._exec(code, f"<cell-{self.cells}>")
            self.flush_figures()
        except BaseException as e:  # SystemExit included: exit() ends the cell, not the kernel
            self.phase = "after"
            status = "memory" if isinstance(e, MemoryError) else "error"
            if isinstance(e, KeyboardInterrupt) and self.interrupted:
                status = "interrupted"  # the pool's SIGINT at the deadline, not the code's own
            else:
                err.write(self._format(e))
        finally:
            self.phase = "after"
            sys.stdout, sys.stderr = saved
        images = [] if status == "interrupted" else self.collect_images()
        self.plt.close("all")
        for note in self.notes:
            err.write(("\n" if err.total else "") + note)
        return {"status": status, "stdout": out.text(), "stderr": err.text(),
                "images": [base64.b64encode(png).decode() for png in images]}

    def show(self, *objs: Any) -> None:
        """Return images with this cell's result: PIL images, arrays (HxW[xC]) or figures."""
        for obj in objs:
            if isinstance(obj, self.Figure):
                self._render(obj)
            elif isinstance(obj, self.Image.Image):
                self.shown.append(obj.copy())
            elif isinstance(obj, self.np.ndarray):
                arr = obj
                if arr.dtype.kind == "f":
                    arr = (self.np.clip(self.np.nan_to_num(arr), 0, 1) * 255).round()
                self.shown.append(self.Image.fromarray(arr.astype(self.np.uint8)))
            else:
                self.notes.append(f"[show(): a {type(obj).__name__} is not a PIL image, an array or a figure]")

    def _render(self, fig: Any) -> None:
        """One figure to PNG at a dpi that keeps it under max_image_pixels."""
        w, h = fig.get_size_inches()
        dpi = float(fig.dpi)
        max_px = int(self.limits["max_image_pixels"])
        if w * h * dpi * dpi > max_px and w * h > 0:
            dpi = (max_px / (w * h)) ** 0.5
            self.notes.append(f"[a {w:g}x{h:g} in figure was rendered at {dpi:.0f} dpi (at most {max_px} pixels)]")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        self.figures.append(buf.getvalue())

    def flush_figures(self) -> None:
        """Render and close every open figure (what `plt.show()` does here)."""
        for num in self.plt.get_fignums():
            self._render(self.plt.figure(num))
        self.plt.close("all")

    def collect_images(self) -> list[bytes]:
        """Figures, then shown images, capped in number and size, as PNG bytes."""
        max_images, max_px = int(self.limits["max_images"]), int(self.limits["max_image_pixels"])
        pngs = self.figures[:max_images]
        for img in self.shown[:max_images - len(pngs)]:
            w, h = img.size
            if w * h > max_px:
                s = (max_px / (w * h)) ** 0.5
                img = img.resize((max(1, int(w * s)), max(1, int(h * s))))
                self.notes.append(f"[an image of {w}x{h} was downscaled to {img.size[0]}x{img.size[1]}]")
            if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
                img = img.convert("RGBA" if "A" in img.mode else "RGB")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        dropped = len(self.figures) + len(self.shown) - len(pngs)
        if dropped > 0:
            self.notes.append(f"[{dropped} more image(s) left out: at most {max_images} per call]")
        return pngs


class Template:
    """The pool's handle on the template process: start it, ask it for kernels, stop it."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.lock, self.start_s = folder, threading.Lock(), 0.0
        self.proc: subprocess.Popen | None = None
        self.ctrl: socket.socket | None = None

    def start(self) -> None:
        t0 = time.monotonic()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log = self.folder / "template.log"
        with open(log, "ab") as err:  # cwd: where `-m` finds services/ (no PYTHONPATH needed)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.tools.sandbox.kernel", "--ctrl-fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=kernel_env(str(self.folder)), cwd=Path(__file__).resolve().parents[3],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        theirs.close()
        ours.settimeout(TEMPLATE_START_S)
        try:
            ok = json.loads(ours.recv(1 << 16)).get("op") == "ready"
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            ours.close()
            self.proc.kill()
            self.proc.wait()
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the sandbox template did not start; {log} ends:\n{tail}")
        ours.settimeout(CONTROL_S)
        self.ctrl, self.start_s = ours, time.monotonic() - t0

    def spawn(self, spec: dict[str, Any], fds: list[int]) -> tuple[int, int]:
        """One holder+kernel: its pid and pidfd. A dead template is started again, once."""
        with self.lock:
            for attempt in range(2):
                try:
                    if self.ctrl is None:
                        self.start()
                    socket.send_fds(self.ctrl, [json.dumps(spec).encode()], fds)
                    msg, pidfds, _, _ = socket.recv_fds(self.ctrl, 1 << 16, 1)
                    if msg:
                        break
                    raise ConnectionError("the template closed its socket")
                except OSError:
                    self.stop()
                    if attempt:
                        raise
            reply = json.loads(msg)
            if not pidfds:
                raise RuntimeError(f"the template could not start a kernel: {reply.get('error', 'it died at once')}")
            return int(reply["pid"]), pidfds[0]

    def stop(self) -> None:
        """Close the socket: the template kills the holders it still has and exits."""
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        if self.proc is not None:
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def main(argv: list[str]) -> None:
    """`python -m services.tools.sandbox.kernel --ctrl-fd N`: the template (only Template starts it)."""
    serve_template(int(argv[argv.index("--ctrl-fd") + 1]))


if __name__ == "__main__":
    main(sys.argv)
