"""The Serve YAMLs in deploy/: valid for Ray's own schema, wired to our builders, and in agreement
with the scenario each one names (replicas and resources live in both; they must not drift)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deepeyes.config import REPO_ROOT, load_config
from deepeyes.serving import APP_NAMES, ROUTE_PREFIXES, config_from_args

DEPLOY = REPO_ROOT / "deploy"
SERVE_YAMLS = ["serve.yaml", "serve-gpu-8x.yaml", "serve-multinode.yaml"]
DEPLOYMENT_OF = {"tools": "ToolService", "judge": "JudgeService", "rollout": "RolloutWorker"}


def serve_config(name: str) -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / name).read_text()))


def deployment_class_names() -> dict[str, str]:
    """The deployment names the builders produce, read from the Serve classes themselves."""
    from services.judge.app import JudgeService
    from services.rollout.app import RolloutWorker
    from services.tools.app import ToolService

    return {"tools": ToolService.name, "judge": JudgeService.name, "rollout": RolloutWorker.name}


@pytest.mark.parametrize("name", SERVE_YAMLS)
def test_serve_yaml_is_a_valid_serve_config_with_our_three_apps(name: str) -> None:
    cfg = serve_config(name)
    assert cfg.http_options.host == "127.0.0.1"  # loopback unless the operator means otherwise
    apps = {a.name: a for a in cfg.applications}
    assert sorted(apps) == sorted(APP_NAMES.values())
    names = deployment_class_names()
    assert names == DEPLOYMENT_OF
    for key, app in apps.items():
        assert app.route_prefix == ROUTE_PREFIXES[key]
        assert app.import_path == f"services.{key}.app:build_app"
        # A deployment entry under a name the builder does not produce fails only at deploy time.
        assert [d.name for d in app.deployments] == [names[key]]
        config_from_args(app.args)  # args parse into the one Config tree (unknown keys would raise)


@pytest.mark.parametrize("name,scenario", [("serve.yaml", "tiny-cpu.yaml"),
                                           ("serve-gpu-8x.yaml", "deepeyes-7b.yaml")])
def test_serve_yaml_agrees_with_its_scenario(name: str, scenario: str) -> None:
    """The YAML's deployment settings override the builder's; both must say the same thing so a
    trainer that deploys the apps itself (nothing running) gets the layout `serve deploy` gets."""
    cfg = serve_config(name)
    for app in cfg.applications:
        assert Path(app.args["config"]).name == scenario
        dc = getattr(config_from_args(app.args).serve, app.name)
        (dep,) = app.deployments
        assert dep.num_replicas == dc.num_replicas, (app.name, "num_replicas")
        assert dep.max_ongoing_requests == dc.max_ongoing_requests, (app.name, "max_ongoing_requests")
        assert dep.ray_actor_options.num_cpus == dc.num_cpus, (app.name, "num_cpus")
        assert dep.ray_actor_options.num_gpus == dc.num_gpus, (app.name, "num_gpus")


def test_gpu_yaml_runs_vllm_one_gpu_per_replica_and_the_sglang_judge() -> None:
    apps = {a.name: a for a in serve_config("serve-gpu-8x.yaml").applications}
    rollout = config_from_args(apps["rollout"].args)
    assert rollout.rollout.engine == "vllm"
    assert apps["rollout"].deployments[0].ray_actor_options.num_gpus == 1
    judge = config_from_args(apps["judge"].args)
    assert (judge.judge.backend, judge.judge.base_url) == ("openai", "http://127.0.0.1:18901/v1")
    # 4 rollout GPUs + 4 Train workers fill one 8-GPU node
    gpus = sum(a.deployments[0].num_replicas * a.deployments[0].ray_actor_options.num_gpus
               for a in apps.values())
    assert gpus == 4


def test_cpu_yaml_rollout_starts_from_the_policy_a_default_trainer_run_would_publish() -> None:
    """The rollout app of serve.yaml loads model.path=tiny (raw init): the trainer must start from
    the same folder, i.e. model.warm_start=false, or the first step would be off-policy."""
    apps = {a.name: a for a in serve_config("serve.yaml").applications}
    cfg = config_from_args(apps["rollout"].args)
    assert cfg.model.path == "tiny"
    assert (cfg.model.seed, cfg.model.min_pixels, cfg.model.max_pixels) == \
        (load_config().model.seed, load_config().model.min_pixels, load_config().model.max_pixels)


def test_multinode_yaml_spreads_rollout_and_tools_one_replica_per_node() -> None:
    apps = {a.name: a for a in serve_config("serve-multinode.yaml").applications}
    for key in ("rollout", "tools"):
        (dep,) = apps[key].deployments
        assert dep.num_replicas == 2 and dep.max_replicas_per_node == 1
        assert "deepeyes_node" in dep.ray_actor_options.resources


def test_multinode_yaml_is_serve_yaml_but_for_replica_placement() -> None:
    """The suite deploys serve-multinode.yaml (tests/integration/test_deploy_job.py, two nodes);
    serve.yaml stands on that run only if the two differ in replica counts and placement alone."""
    one, many = (yaml.safe_load((DEPLOY / n).read_text()) for n in ("serve.yaml", "serve-multinode.yaml"))
    placement = {"num_replicas", "max_replicas_per_node", "ray_actor_options"}
    assert one["http_options"] == many["http_options"]
    assert len(one["applications"]) == len(many["applications"])
    for a, b in zip(one["applications"], many["applications"]):
        assert {k: v for k, v in a.items() if k != "deployments"} == {k: v for k, v in b.items() if k != "deployments"}
        for da, db in zip(a["deployments"], b["deployments"], strict=True):
            assert {k: v for k, v in da.items() if k not in placement} == \
                {k: v for k, v in db.items() if k not in placement}, (a["name"], da, db)


def test_relative_scenario_path_resolves_against_the_repository(tmp_path, monkeypatch) -> None:
    """`serve deploy` builds apps in a worker whose cwd is not the repo: the YAML's relative
    `config:` must still name the repository's scenario."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("deploy/configs/deepeyes-7b.yaml")
    assert cfg.trainer.batch_size == 128  # the 7B scenario's value, not the tiny default (4)


def test_cpu_llm_yaml_wires_the_judge_to_the_in_cluster_llm() -> None:
    """deploy/serve-cpu-llm.yaml: our three apps plus judge-llm (ray.serve.llm on CPU); the judge
    app's base_url is this file's HTTP port + the judge-llm route, and the LLMConfig validates."""
    from ray.serve.llm import LLMConfig

    from services.judge.backends import serve_llm_config

    cfg = serve_config("serve-cpu-llm.yaml")
    assert cfg.http_options.host == "127.0.0.1"
    apps = {a.name: a for a in cfg.applications}
    assert sorted(apps) == sorted([*APP_NAMES.values(), "judge-llm"])
    llm, judge = apps["judge-llm"], config_from_args(apps["judge"].args)
    assert llm.import_path == "services.judge.llm_app:build_app"
    assert judge.judge.backend == "serve-llm"
    assert judge.judge.base_url == f"http://127.0.0.1:{cfg.http_options.port}{llm.route_prefix}/v1"
    assert config_from_args(apps["rollout"].args).rollout.engine == "vllm"
    jc = config_from_args(llm.args).judge
    llm_cfg = LLMConfig(**serve_llm_config(jc, model_source="/models/tiny"))
    assert llm_cfg.accelerator_config.kind == "cpu"
    assert llm_cfg.engine_kwargs["enforce_eager"] and llm_cfg.engine_kwargs["tensor_parallel_size"] == 1
    gpu = LLMConfig(**serve_llm_config(config_from_args({"config": "deploy/configs/deepeyes-7b.yaml"}).judge,
                                       accelerator_type="H100"))
    assert gpu.engine_kwargs["tensor_parallel_size"] == 8 and gpu.accelerator_config.kind == "gpu"
