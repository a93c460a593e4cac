"""The in-cluster judge LLM: a `ray.serve.llm` OpenAI application built from the scenario config.

`judge.backend=serve-llm` points the judge app at this app's route (judge.base_url =
`http://<serve host>:<port><route_prefix>/v1`); deploy both from one Serve YAML
(`deploy/serve-cpu-llm.yaml` on CPU with the tiny judge, `deploy/serve-gpu-8x.yaml`'s commented
`judge-llm` app for Qwen2.5-72B on 8 GPUs):

    - name: judge-llm
      route_prefix: /judge-llm
      import_path: services.judge.llm_app:build_app
      args: {config: deploy/configs/<scenario>.yaml, overrides: [...]}

The LLMConfig comes from `services.judge.backends.serve_llm_config` (the one place for it), so
the YAML, the trainer and the tests read the same judge settings.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from deepeyes.serving import config_from_args
from services.judge.backends import serve_llm_config
from services.judge.hf import tiny_text_model_path


def resolve_source(source: str, cache_dir: str) -> str:
    """'tiny-text' -> the locally built tiny judge folder; anything else as given."""
    if source == "tiny-text":
        return str(tiny_text_model_path(cache_dir))
    return source


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The ray.serve.llm OpenAI app for `judge.*` of the scenario ({"config": path, "overrides": [...]})."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app  # ray.serve.llm pulls vLLM: only this app
    except ImportError as e:
        raise RuntimeError(f"judge.backend=serve-llm needs ray.serve.llm and vLLM (the gpu or cpu extra; "
                           f"scripts/setup.sh installs one): {e}") from e
    cfg = config_from_args(args)
    source = resolve_source(cfg.judge.serve_llm_source, cfg.model.cache_dir)
    accelerator = (args or {}).get("accelerator_type")
    return build_openai_app({"llm_configs": [LLMConfig(**serve_llm_config(cfg.judge, accelerator, source))]})
