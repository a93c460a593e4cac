"""Measured tensor memory on CPU: the peak of live tensor bytes while a function runs, from the
torch profiler's memory timeline (every allocation and free the profiler sees, in order). It is
what `python -m trainer plan` is checked against (tests/unit/test_memory_plan.py)."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from torch.profiler import ProfilerActivity, profile


def peak_tensor_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(live tensor bytes when `fn` starts, the most live at any point while it runs), on CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the CPU timeline has no successor API yet
        path = Path(d) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(s) for s in sizes]
    return (totals[0], max(totals)) if totals else (0, 0)
