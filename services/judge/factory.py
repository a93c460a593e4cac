"""`make_judge(cfg)`: the Judge that runs judge.backend.

Its own module because it needs every backend: `hf.py` builds on `backends.py`, so the choice
cannot live in `backends.py` without an import circle.
"""

from __future__ import annotations

from deepeyes.config import DEFAULT_CACHE_DIR, JudgeConfig
from services.judge.backends import SERVE_LLM_MODEL_ID, Judge, OpenAIJudge, RuleJudge
from services.judge.hf import HFJudge


def make_judge(cfg: JudgeConfig, cache_dir: str = DEFAULT_CACHE_DIR) -> Judge:
    """The judge named by cfg.backend. cache_dir: where the hf backend's tiny model is cached."""
    if cfg.backend == "rule":
        return RuleJudge()
    if cfg.backend == "openai":
        return OpenAIJudge(cfg)
    if cfg.backend == "serve-llm":
        return OpenAIJudge(cfg, model=cfg.model or SERVE_LLM_MODEL_ID)
    if cfg.backend == "hf":
        return HFJudge(cfg, cache_dir)
    raise ValueError(f"unknown judge.backend {cfg.backend!r}")
