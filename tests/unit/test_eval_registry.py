"""The evaluation CLI's benchmark registry: adding a benchmark is one module in
trainer/eval/benchmarks/ (here written into a temporary folder on the package's path), and it then
has its flag, its run and its twin; the built-in three keep their names and order."""

from __future__ import annotations

import sys

import pytest

import trainer.eval.benchmarks as benchmarks_pkg
from deepeyes.config import load_config
from trainer.eval.benchmarks import registry
from trainer.eval.cli import benchmarks, parse_args

PLUGIN = '''
from trainer.eval.benchmarks import Benchmark
from trainer.eval.items import Item


def read(source, name, cfg):
    for i in range(int(source)):
        yield Item(benchmark=name, id=str(i), category="toy", question="Which letter?", options=["x", "y"],
                   answer=i % 2, image=b"")


BENCHMARK = Benchmark(name="toybench", help="N toy items", read=read, order=40,
                      twin=lambda out, items, seed: str(items))
'''


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    (tmp_path / "toybench.py").write_text(PLUGIN)
    monkeypatch.setattr(benchmarks_pkg, "__path__", [*benchmarks_pkg.__path__, str(tmp_path)])
    yield
    sys.modules.pop("trainer.eval.benchmarks.toybench", None)


def test_the_built_in_benchmarks_in_order():
    assert [b.name for b in registry()] == ["vstar", "hrbench", "synthetic"]
    assert [b.name for b in registry() if b.default_source] == ["synthetic"]


def test_a_new_module_adds_its_flag_its_run_and_its_twin(toy_module, tmp_path):
    assert [b.name for b in registry()][-1] == "toybench"
    cfg = load_config(None, [])
    args = parse_args(["--toybench", "3", "--toybench", "2"])
    found = benchmarks(args, cfg, tmp_path / "out")
    assert [name for name, _ in found] == ["toybench", "toybench_2"]
    items = list(found[0][1]())
    assert [(i.benchmark, i.id, i.answer) for i in items] == [("toybench", "0", 0), ("toybench", "1", 1),
                                                                     ("toybench", "2", 0)]
    twins = benchmarks(parse_args(["--twins", "--twin-items", "2"]), cfg, tmp_path / "out")
    assert ("toybench", 2) in [(name, len(list(it()))) for name, it in twins]


def test_a_module_without_a_benchmark_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text("X = 1\n")
    monkeypatch.setattr(benchmarks_pkg, "__path__", [*benchmarks_pkg.__path__, str(tmp_path)])
    try:
        with pytest.raises(TypeError, match="broken must define BENCHMARK"):
            registry()
    finally:
        sys.modules.pop("trainer.eval.benchmarks.broken", None)
