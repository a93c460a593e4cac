"""The benchmark registry of `python -m trainer eval`: one module in this folder per benchmark.

A module here defines `BENCHMARK = Benchmark(...)`: its flag (`--<name>`, repeatable, one source
per use), how a source becomes items, the result's name, and optionally a small twin for `--twins`
and a default source when no benchmark is named. The CLI builds its flags and its run list from
`registry()`; nothing else changes when a benchmark is added.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from trainer.eval.items import Item


@dataclass(frozen=True)
class Benchmark:
    """One benchmark the evaluation CLI can run.

    Attributes:
        name: the flag (`--name SOURCE`) and the result's base name.
        help: the flag's help text.
        read: (source, result name, config) -> the items of that source.
        result_name: source -> the result's name (e.g. HR-Bench's 4K or 8K); default `name`.
        prepare: (source, out dir, config) -> the source to read (e.g. a row count written as a
            parquet file); default: the source as given.
        twin: (out dir, items, seed) -> the source of a small stand-in written there, for `--twins`.
        default_source: run with this source when no benchmark is named (one benchmark has it).
        order: the place among the flags and the results.
    """

    name: str
    help: str
    read: Callable[[str, str, Any], Iterator[Item]]
    result_name: Callable[[str], str] | None = None
    prepare: Callable[[str, Path, Any], str] | None = None
    twin: Callable[[Path, int, int], str] | None = None
    default_source: str | None = None
    order: int = 100


def registry() -> list[Benchmark]:
    """Every `BENCHMARK` of the modules in this folder, by `order` then name."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        bench = vars(module).get("BENCHMARK")
        if not isinstance(bench, Benchmark):
            raise TypeError(f"{module.__name__} must define BENCHMARK = Benchmark(...) (every module in "
                            f"trainer/eval/benchmarks/ is a benchmark), got {type(bench).__name__}")
        found.append(bench)
    names = [b.name for b in found]
    if len(set(names)) != len(names):
        raise ValueError(f"two benchmarks share a name: {sorted(names)}")
    return sorted(found, key=lambda b: (b.order, b.name))
