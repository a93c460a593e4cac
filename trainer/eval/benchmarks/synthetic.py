"""The synthetic V*-like set: a DeepEyes-schema parquet, or N rows written into the out folder."""

from pathlib import Path
from typing import Any

from deepeyes.data import write_synthetic
from trainer.eval.benchmarks import Benchmark
from trainer.eval.items import read_parquet


def prepare(source: str, out: Path, cfg: Any) -> str:
    if not source.isdigit():
        return source
    path = out / "data" / "synthetic.parquet"
    write_synthetic(str(path), int(source), cfg.data.synthetic_seed, mix={"vstar": 1.0}, split="test")
    return str(path)


BENCHMARK = Benchmark(
    name="synthetic", order=30, default_source="16",
    help="DeepEyes-schema parquet, or a number N: write N synthetic V*-like rows and use them",
    read=lambda source, name, cfg: read_parquet([source], cfg.data, name),
    prepare=prepare,
)
