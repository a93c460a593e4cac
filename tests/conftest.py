"""Shared fixtures: the tiny policy folder (built once per session) and one local Ray cluster."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


GROUPS = ("unit", "integration", "e2e", "chaos", "fuzz")  # one per folder under tests/: `pytest -m GROUP`


def pytest_collection_modifyitems(config, items):
    for item in items:  # the group mark follows the folder (README: "Tests, by group")
        group = item.path.parent.name
        if group in GROUPS:
            item.add_marker(getattr(pytest.mark, group))
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and the gpu extra")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """The tiny Qwen2.5-VL at the tiny-cpu config's pixel bounds, in a per-session cache."""
    from deepeyes.config import load_config
    from deepeyes.policy import tiny_policy_path

    cfg = load_config().model
    cache = os.environ.get("DEEPEYES_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    return tiny_policy_path(cache, cfg.seed, cfg.min_pixels, cfg.max_pixels)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (and Serve on a free loopback port) shared by the integration tests."""
    import ray
    from ray import serve

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield {"http_port": port}
    serve.shutdown()
    ray.shutdown()
