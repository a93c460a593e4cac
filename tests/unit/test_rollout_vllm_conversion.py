"""vLLM request/response conversion with plain objects (the engine itself: tests/integration/test_vllm_engine.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from services.rollout.engines import SamplingParams
from services.rollout.vllm_engine import (collapse_image_pads, from_vllm_output, to_vllm_prompt,
                                          to_vllm_sampling_kwargs, weight_buckets)

PAD = 855


def test_prompt_collapses_each_pad_run_to_one_placeholder():
    ids = [1, 2, 853, PAD, PAD, PAD, 854, 7, 853, PAD, PAD, 854, 9]
    imgs = [Image.new("RGB", (56, 56)), Image.new("RGB", (28, 56))]
    p = to_vllm_prompt(ids, imgs, PAD)
    assert p["prompt_token_ids"] == [1, 2, 853, PAD, 854, 7, 853, PAD, 854, 9]
    assert p["multi_modal_data"]["image"] == imgs
    assert to_vllm_prompt([1, 2], [], PAD) == {"prompt_token_ids": [1, 2]}
    with pytest.raises(ValueError, match="2 image pad runs but 1 images"):
        collapse_image_pads(ids, PAD, 1)


def test_sampling_kwargs():
    kw = to_vllm_sampling_kwargs(SamplingParams(17, 0.8, top_p=0.9, top_k=20, stop_token_ids=[845], seed=3,
                                                banned_token_ids=[855, 856]))
    assert kw == {"max_tokens": 17, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "stop_token_ids": [845],
                  "logprobs": 0, "detokenize": False, "skip_special_tokens": False, "seed": 3,
                  "logit_bias": {855: -100.0, 856: -100.0}}
    greedy = to_vllm_sampling_kwargs(SamplingParams(5, 0.0, top_p=0.5, top_k=3))
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == -1 and greedy["top_p"] == 1.0
    assert "seed" not in greedy and "logit_bias" not in greedy


def test_output_conversion_reads_the_sampled_tokens_logprob():
    Logprob = lambda v: SimpleNamespace(logprob=v, rank=1)  # noqa: E731  (vllm.sequence.Logprob's shape)
    out = SimpleNamespace(token_ids=(5, 9, 845), finish_reason="stop",
                          logprobs=[{5: Logprob(-0.1)}, {9: Logprob(-2.5), 4: Logprob(-0.3)}, {845: Logprob(-0.01)}])
    r = from_vllm_output(out)
    assert r.token_ids == [5, 9, 845] and r.logprobs == [-0.1, -2.5, -0.01] and r.finish_reason == "stop"
    cut = from_vllm_output(SimpleNamespace(token_ids=[5], finish_reason="length", logprobs=[{5: Logprob(-1.0)}]))
    assert cut.finish_reason == "length"
    with pytest.raises(ValueError, match="logprobs=0"):
        from_vllm_output(SimpleNamespace(token_ids=[5], finish_reason="length", logprobs=None))


def test_weight_buckets_bound_the_message_size():
    sd = {"a": torch.zeros(100), "b": torch.zeros(100), "c": torch.zeros(300), "d": torch.zeros(10)}
    buckets = list(weight_buckets(sd, bucket_bytes=800))  # 400 B, 400 B, 1200 B, 40 B
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"]]


def test_engine_kwargs_mean_the_same_on_cpu_and_gpu():
    from deepeyes.config import load_config
    from services.rollout.vllm_engine import engine_kwargs, logprobs_mode_for

    cfg = load_config(overrides=["rollout.kv_cache_gb=1.5", "rollout.enforce_eager=true"])
    kw = engine_kwargs("/m", cfg.model, cfg.rollout)
    assert kw["kv_cache_memory_bytes"] == int(1.5 * 2**30) and kw["enforce_eager"] is True
    assert kw["max_model_len"] == cfg.rollout.max_prompt_length + cfg.rollout.max_response_length
    assert kw["limit_mm_per_prompt"] == {"image": cfg.rollout.max_assistant_turns + 1}
    assert kw["worker_extension_cls"] == "services.rollout.vllm_engine.WeightLoaderExtension"
    assert "kv_cache_memory_bytes" not in engine_kwargs("/m", cfg.model, load_config().rollout)
    # raw log-probs are log_softmax(logits) = the trainer's quantity at T=1 and for greedy
    assert kw["logprobs_mode"] == "raw_logprobs"
    assert logprobs_mode_for(0.0) == "raw_logprobs" and logprobs_mode_for(0.7) == "processed_logprobs"


def test_bucket_files_round_trip_exactly(tmp_path):
    import torch
    from safetensors.torch import load_file

    from services.rollout.vllm_engine import shared_memory_dir, write_bucket

    t = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.bfloat16)}
    back = load_file(write_bucket(list(t.items()), str(tmp_path)))
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) and back[k].dtype == t[k].dtype for k in t)
    assert shared_memory_dir() in ("/dev/shm", __import__("tempfile").gettempdir())
