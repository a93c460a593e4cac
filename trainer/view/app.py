"""The run viewer's server: a run folder in, a web page and its JSON out.

It reads the folder on every request, so a run still being written shows its new steps on the
next refresh: `metrics.jsonl` for the step figures, `trajectories/step_NNNNNN.jsonl` and their
thumbnails for the episodes (trainer/metrics.py writes both). A JSONL line that does not parse
(the writer's half-written last line) is left out, never an error.

An evaluation folder (`python -m trainer eval --out DIR`: eval.json, items.jsonl, images/,
plots/; no metrics.jsonl) opens in the same page: its benchmarks and modes with their headline
figures (eval.json's; while the harness is still running, computed from the items.jsonl lines
so far by the protocol's own summarize), and per benchmark its episodes.

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

    def is_eval(self) -> bool:
        """An evaluation harness's folder: eval.json or items.jsonl, and no training metrics."""
        return (not (self.root / "metrics.jsonl").exists()
                and ((self.root / "eval.json").is_file() or (self.root / "items.jsonl").is_file()))

    def eval_items(self, benchmark: str | None = None) -> list[dict[str, Any]]:
        """items.jsonl's records (one per episode), those of `benchmark` only when named."""
        records = [r for r in read_jsonl(self.root / "items.jsonl") if isinstance(r, dict)]
        return records if benchmark is None else [r for r in records if r.get("benchmark") == benchmark]

    def eval_summary(self) -> dict[str, Any]:
        """Per benchmark and mode: the headline figures and how many episodes items.jsonl holds."""
        from trainer.eval.protocol import Outcome, summarize  # eval folders only: a run folder's viewer stays light

        try:
            done = json.loads((self.root / "eval.json").read_text())
        except (FileNotFoundError, ValueError):
            done = {}
        figures = done.get("benchmarks") if isinstance(done.get("benchmarks"), dict) else {}
        records = self.eval_items()
        grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for r in records:
            grouped.setdefault(str(r.get("benchmark")), {}).setdefault(str(r.get("mode")), []).append(r)
        k = (done.get("protocol") or {}).get("k") or max((int(r.get("sample", 0)) + 1 for r in records), default=1)
        benchmarks = []
        for bench in list(figures) + [b for b in grouped if b not in figures]:
            modes = []
            for mode in list(figures.get(bench, {})) + [m for m in grouped.get(bench, {}) if m not in figures.get(bench, {})]:
                eps = grouped.get(bench, {}).get(mode, [])
                s = figures.get(bench, {}).get(mode)
                final = s is not None
                if s is None:  # the harness is still on it: the figures of the episodes so far
                    s = summarize([Outcome(item=str(r.get("item")), category=str(r.get("category")), mode=mode,
                                           sample=int(r.get("sample", 0)), correct=bool(r.get("correct")),
                                           scored_by=str(r.get("scored_by")),
                                           tool_calls=sum(1 for c in r.get("tool_calls") or [] if c.get("executed")),
                                           answered=r.get("answer") is not None) for r in eps], k)
                modes.append({"mode": mode, "final": final, "saved": len(eps), **s})
            plot = f"plots/{bench}.png"
            benchmarks.append({"benchmark": bench, "modes": modes,
                               "plot": "files/" + plot if self.file(plot) else None})
        return {"benchmarks": benchmarks, "protocol": done.get("protocol"), "model": done.get("model"),
                "wall_s": done.get("wall_s"), "finished": bool(done)}

    def summary(self) -> dict[str, Any]:
        extras = {name: "files/" + name for name in ("config.yaml", "summary.json", "plots/curves.png", "eval.json")
                  if (self.root / name).is_file()}
        if self.is_eval():
            return {"kind": "eval", "run_dir": str(self.root), "links": extras, "eval": self.eval_summary()}
        return {"kind": "train", "run_dir": str(self.root), "steps": self.steps(), "links": extras}


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

    @app.get("/api/eval/{benchmark}")
    def eval_episodes(benchmark: str) -> JSONResponse:
        """The items.jsonl records of one benchmark (a name looked up among them, never a path)."""
        return JSONResponse(json_safe(run.eval_items(benchmark)), headers={"Cache-Control": "no-store"})

    @app.get("/files/{relative:path}")
    def run_file(relative: str) -> FileResponse:
        path = run.file(relative)
        if path is None:
            raise NOT_FOUND
        return FileResponse(path)

    return app


def serve(run_dir: str | Path, host: str, port: int) -> None:
    import uvicorn  # uvicorn: only when serving

    print(f"viewing {Path(run_dir).resolve()} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(build_app(run_dir), host=host, port=port, log_level="warning")
