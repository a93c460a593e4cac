"""The KubeRay manifests agree with each other and with the files they stand for: one image, the
RayService's Serve config = deploy/serve-gpu-8x.yaml, the RayJob runs a scenario that exists and
its cluster has the GPUs that scenario asks for."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml
from ray.serve.schema import ServeDeploySchema

from deepeyes.config import REPO_ROOT, load_config

KUBERAY = REPO_ROOT / "deploy" / "kuberay"
JUDGE_URL = "http://deepeyes-judge:18901/v1"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def one(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs(name) if d["kind"] == kind]
    return doc


def containers(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def gpus(cluster_spec: dict[str, Any]) -> int:
    """GPUs of the cluster at its configured size (workers' limits x replicas)."""
    total = 0
    for g in cluster_spec["workerGroupSpecs"]:
        per_pod = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in g["template"]["spec"]["containers"])
        total += per_pod * g["replicas"]
    return total


def entrypoint_args() -> tuple[str, list[str]]:
    argv = shlex.split(one("rayjob.yaml", "RayJob")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "trainer"]
    assert argv[3] == "--config"
    return argv[4], argv[5:]


def test_one_image_everywhere() -> None:
    service = one("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]
    job = one("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]
    images = {c["image"] for c in containers(service) + containers(job)}
    assert len(images) == 1, images
    assert service["rayVersion"] == job["rayVersion"]


def test_rayservice_runs_the_gpu_serve_config() -> None:
    embedded = yaml.safe_load(one("rayservice.yaml", "RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)  # what KubeRay hands to Serve must be valid
    reference = yaml.safe_load((REPO_ROOT / "deploy" / "serve-gpu-8x.yaml").read_text())["applications"]
    # The one allowed difference: in Kubernetes the judge reaches sglang through its Service.
    for app in reference:
        if app["name"] == "judge":
            app["args"]["overrides"] = [f"judge.base_url={JUDGE_URL}" if o.startswith("judge.base_url=") else o
                                        for o in app["args"]["overrides"]]
    assert embedded["applications"] == reference


def test_judge_service_is_the_url_the_apps_and_the_job_use() -> None:
    service = one("judge-sglang.yaml", "Service")
    port = service["spec"]["ports"][0]["port"]
    assert JUDGE_URL == f"http://{service['metadata']['name']}:{port}/v1"
    command = one("judge-sglang.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    flags = dict(zip(command[3::2], command[4::2]))
    assert (flags["--port"], flags["--tp-size"], flags["--context-length"]) == (str(port), "8", "32768")
    _, overrides = entrypoint_args()
    assert f"judge.base_url={JUDGE_URL}" in overrides


def test_rayjob_runs_an_existing_scenario_with_enough_gpus() -> None:
    scenario, overrides = entrypoint_args()
    assert Path(scenario).name == "deepeyes-7b.yaml"
    assert (REPO_ROOT / scenario).exists()
    cfg = load_config(REPO_ROOT / scenario, overrides)
    assert cfg.trainer.run_dir.startswith("/mnt/runs/")  # absolute: not inside the job's unpacked dir
    assert cfg.trainer.resume == "auto"
    assert cfg.trainer.use_gpu
    # The driver deploys the apps itself from the scenario's serve.* section in a fresh cluster.
    needed = cfg.trainer.num_workers + sum(
        d.num_replicas * d.num_gpus for d in (cfg.serve.tools, cfg.serve.judge, cfg.serve.rollout))
    job = one("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]
    assert gpus(job) >= needed, (gpus(job), needed)
    mounts = {m["mountPath"] for c in containers(job) for m in c.get("volumeMounts", [])}
    assert "/mnt/runs" in mounts


def test_rayjob_and_rayservice_rollout_start_from_the_same_checkpoint() -> None:
    _, overrides = entrypoint_args()
    embedded = yaml.safe_load(one("rayservice.yaml", "RayService")["spec"]["serveConfigV2"])
    rollout = next(a for a in embedded["applications"] if a["name"] == "rollout")
    paths = {o for o in overrides + rollout["args"]["overrides"] if o.startswith("model.path=")}
    assert len(paths) == 1, paths


def test_rayservice_cluster_fits_its_serve_config() -> None:
    spec = one("rayservice.yaml", "RayService")["spec"]
    embedded = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    needed = sum(d.num_replicas * d.ray_actor_options.num_gpus for a in embedded.applications for d in a.deployments)
    assert gpus(spec["rayClusterConfig"]) >= needed
