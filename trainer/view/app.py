"""The run viewer's server: a run folder in, a web page and its JSON out.

It reads the folder on every request, so a run still being written shows its new steps on the
next refresh: `metrics.jsonl` for the step figures, `trajectories/step_NNNNNN.jsonl` and their
thumbnails for the episodes (trainer/metrics.py writes both). A JSONL line that does not parse
(the writer's half-written last line) is left out, never an error.

For trusted networks only: no authentication, bound to 127.0.0.1 unless told otherwise. Files are
served from inside the run folder only: a path that resolves outside it (`..`, absolute, a
symlink leading out) or to anything but a regular file is a 404.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse

STATIC = Path(__file__).parent / "static"
STEP_FILE = re.compile(r"step_(\d+)\.jsonl")
NOT_FOUND = HTTPException(status_code=404, detail="not found")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file that may still be growing; lines that do not parse are left out."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def json_safe(value: Any) -> Any:
    """NaN and infinities as None: JSON has neither (judge.failure_policy=drop leaves NaN scores)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class RunFolder:
    """What the page reads of a run folder, read afresh on each call."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path).resolve()
        self.trajectories = self.root / "trajectories"

    def file(self, relative: str) -> Path | None:
        """`relative` as a regular file inside the run folder, symlinks followed; else None."""
        if "\0" in relative:
            return None
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def step_files(self) -> dict[int, Path]:
        if not self.trajectories.is_dir():
            return {}
        return {int(m.group(1)): p for p in self.trajectories.iterdir() if (m := STEP_FILE.fullmatch(p.name))}

    def steps(self) -> list[dict[str, Any]]:
        """One record per step: its metric rows merged (training, then validation), and how many
        episodes were saved with it."""
        steps: dict[int, dict[str, Any]] = {}
        for row in read_jsonl(self.root / "metrics.jsonl"):
            if isinstance(row.get("step"), int):
                steps.setdefault(row["step"], {"step": row["step"], "saved": 0}).update(row)
        for step, path in self.step_files().items():
            steps.setdefault(step, {"step": step})["saved"] = len(read_jsonl(path))
        return [steps[s] for s in sorted(steps)]

    def episodes(self, step: int) -> list[dict[str, Any]]:
        """The saved episodes of `step` (image names relative to trajectories/)."""
        return read_jsonl(self.trajectories / f"step_{step:06d}.jsonl")

    def summary(self) -> dict[str, Any]:
        extras = {name: "files/" + name for name in ("config.yaml", "summary.json", "plots/curves.png")
                  if (self.root / name).is_file()}
        return {"run_dir": str(self.root), "steps": self.steps(), "links": extras}


def build_app(run_dir: str | Path) -> FastAPI:
    """The viewer of one run folder."""
    run = RunFolder(run_dir)
    static = {p.name: p for p in STATIC.iterdir() if p.is_file()}
    app = FastAPI(title="deepeyes-ray run viewer", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(static["index.html"], headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}")
    def static_file(name: str) -> FileResponse:
        if name not in static:
            raise NOT_FOUND
        return FileResponse(static[name], headers={"Cache-Control": "no-cache"})

    @app.get("/api/run")
    def run_summary() -> JSONResponse:
        return JSONResponse(json_safe(run.summary()), headers={"Cache-Control": "no-store"})

    @app.get("/api/steps/{step}")
    def step_episodes(step: int) -> JSONResponse:
        return JSONResponse(json_safe(run.episodes(step)), headers={"Cache-Control": "no-store"})

    @app.get("/files/{relative:path}")
    def run_file(relative: str) -> FileResponse:
        path = run.file(relative)
        if path is None:
            raise NOT_FOUND
        return FileResponse(path)

    return app


def serve(run_dir: str | Path, host: str, port: int) -> None:
    import uvicorn

    print(f"viewing {Path(run_dir).resolve()} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(build_app(run_dir), host=host, port=port, log_level="warning")
