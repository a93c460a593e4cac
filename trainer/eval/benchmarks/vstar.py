"""V* Bench: a folder (test_questions.jsonl and the images) or the .jsonl itself."""

from pathlib import Path

from trainer.eval.benchmarks import Benchmark
from trainer.eval.items import read_vstar
from trainer.eval.twins import write_vstar_twin

BENCHMARK = Benchmark(
    name="vstar", order=10,
    help="V* Bench folder (or its .jsonl); repeatable",
    read=lambda source, name, cfg: read_vstar(source),
    twin=lambda out, items, seed: str(write_vstar_twin(Path(out) / "vstar_bench", items, seed)),
)
