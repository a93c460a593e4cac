"""deploy/grafana/deepeyes.json only queries metrics the code defines, and shows the whole
vocabulary. Defined = the trainer's gauges (trainer/metrics.py VOCABULARY via prometheus_name)
plus the Serve replicas' ray.util.metrics objects, instantiated here exactly as the services do;
exported names follow Ray's Prometheus rules: a `ray_` prefix, histograms as _bucket/_sum/_count,
counters as _total."""

from __future__ import annotations

import json
import re

from deepeyes.config import REPO_ROOT
from trainer.metrics import KNOWN, VOCABULARY, prometheus_name

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "deepeyes.json"
SERIES = re.compile(r"\bray_[a-zA-Z0-9_]+")


def service_metric_objects() -> list:
    """Every ray.util.metrics object the judge and rollout replicas create (no cluster needed)."""
    from ray.util import metrics

    from services.judge.app import _Metrics as JudgeMetrics
    from services.rollout.app import _Metrics as RolloutMetrics

    found = []
    for holder in (JudgeMetrics(), RolloutMetrics("test")):
        for value in vars(holder).values():
            items = value.values() if isinstance(value, dict) else [value]
            found += [m for m in items if isinstance(m, metrics.Metric)]
    return found


def exported_names() -> set[str]:
    from ray.util import metrics

    names = {f"ray_{prometheus_name(m)}" for m in KNOWN}  # trainer gauges: every name MetricsSink takes
    names |= {f"ray_deepeyes_async_staleness{s}" for s in ("_bucket", "_sum", "_count")}  # its histogram
    for m in service_metric_objects():
        base = f"ray_{m._name}"
        if isinstance(m, metrics.Histogram):
            names |= {base + "_bucket", base + "_sum", base + "_count"}
        elif isinstance(m, metrics.Counter):
            names.add(base + "_total")
        else:
            names.add(base)
    return names


def expressions() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_every_panel_queries_only_defined_metrics() -> None:
    defined = exported_names()
    exprs = expressions()
    assert exprs
    for title, expr in exprs:
        used = SERIES.findall(expr)
        assert used, f"panel {title!r}: {expr!r} names no ray_ metric"
        unknown = [u for u in used if u not in defined]
        assert not unknown, f"panel {title!r} queries {unknown}, which no code defines"


def test_dashboard_shows_the_whole_trainer_vocabulary_and_every_service_metric() -> None:
    used = {u for _, expr in expressions() for u in SERIES.findall(expr)}
    missing = [m for m in VOCABULARY if f"ray_{prometheus_name(m)}" not in used]
    assert not missing, f"no panel for {missing}"
    unseen = [m._name for m in service_metric_objects()
              if not any(u.startswith(f"ray_{m._name}") for u in used)]
    assert not unseen, f"no panel for service metrics {unseen}"


def test_panels_cover_the_operating_questions() -> None:
    titles = " | ".join(json.loads(DASHBOARD.read_text())["panels"][i]["title"].lower()
                        for i in range(len(json.loads(DASHBOARD.read_text())["panels"])))
    for topic in ("reward", "tool calls", "turns", "judge latency", "judge failures", "phase", "throughput"):
        assert topic in titles, topic
