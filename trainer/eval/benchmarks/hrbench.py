"""HR-Bench: a TSV of the 4K or the 8K set (the file name tells which)."""

from pathlib import Path

from trainer.eval.benchmarks import Benchmark
from trainer.eval.items import read_hrbench
from trainer.eval.twins import write_hrbench_twin


def result_name(source: str) -> str:
    name = Path(source).name.lower()
    return "hrbench_8k" if "8k" in name else "hrbench_4k" if "4k" in name else "hrbench"


BENCHMARK = Benchmark(
    name="hrbench", order=20,
    help="HR-Bench TSV (4K or 8K); repeatable",
    read=lambda source, name, cfg: read_hrbench(source, name),
    result_name=result_name,
    twin=lambda out, items, seed: str(write_hrbench_twin(Path(out) / "hr_bench_4k.tsv", items, seed)),
)
