"""vLLM engine (GPU): the Engine interface over vLLM's AsyncLLM (pinned vllm==0.32.*, extra `gpu`).

vllm is imported lazily: this module imports on the CPU box, and its request/response conversion
(pure functions below) is unit-tested there; the engine itself runs only where vllm does.

Conversions, and why:
- Prompt ids. The agent loop's ids carry EXPANDED image pads (one `<|image_pad|>` per merged
  patch), which the trainer needs. vLLM's Qwen2.5-VL processor expands the placeholder itself
  from `multi_modal_data` (its prompt-update step replaces `<|image_pad|>` with the feature
  tokens). vLLM tries to detect already-expanded token prompts, but that detection is
  model-specific and has broken for other VLMs (pre-expanded ids expanded twice), so we hand vLLM
  the unambiguous form: each run of pads collapsed to ONE `<|image_pad|>`, exactly what
  tokenizing the rendered chat text gives, and vLLM expands it back to the same count because the
  images we pass are already in the model frame (sides multiples of 28 within the pixel bounds:
  its smart-resize is the identity). `collapse_image_pads` checks one run per image.
- Log-probs. `logprobs_mode="processed_logprobs"` and `logprobs=0` return the sampled token's
  log-prob after temperature (and logit bias), i.e. log_softmax(logits / T), the HF engine's and
  `sequence_logprobs`' quantity when top_k/top_p are off (the recipe); with top-k/top-p on, vLLM's
  processed values are renormalised over the kept tokens and differ from the trainer's.
- Banned ids (vision placeholders) become `logit_bias` -100: practically never sampled.
- Stop: `stop_token_ids=[<|im_end|>]`; vLLM keeps the stop id as the last output token, which is
  what the agent loop expects.
- Weights. `load_weights` sends the state dict in buckets through `AsyncLLM.collective_rpc` to a
  worker extension (`WeightLoaderExtension`) whose method calls the model runner's
  `model.load_weights(...)` (vLLM's supported in-process update path; it maps HF names), then
  the prefix cache is reset. New requests wait while a load runs and a load waits for running
  requests to finish, so no sequence mixes two versions.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any, Iterable

from PIL import Image

from services.rollout.engines import GenerateResult, SamplingParams

BANNED_LOGIT_BIAS = -100.0
WEIGHT_BUCKET_BYTES = 512 * 2**20  # bound the memory of one collective_rpc message


# ---------------------------------------------------------------------------------------------
# pure conversions (unit-tested without vllm)


def collapse_image_pads(prompt_ids: list[int], image_pad_id: int, num_images: int) -> list[int]:
    """Each run of <|image_pad|> -> one <|image_pad|> (vLLM expands it from the image)."""
    out: list[int] = []
    runs = 0
    for t in prompt_ids:
        if t == image_pad_id:
            if out and out[-1] == image_pad_id:
                continue
            runs += 1
        out.append(t)
    if runs != num_images:
        raise ValueError(f"prompt has {runs} image pad runs but {num_images} images")
    return out


def to_vllm_prompt(prompt_ids: list[int], images: list[Image.Image], image_pad_id: int) -> dict[str, Any]:
    """A vLLM TokensPrompt dict: collapsed ids plus the images (already in the model frame)."""
    prompt: dict[str, Any] = {"prompt_token_ids": collapse_image_pads(prompt_ids, image_pad_id, len(images))}
    if images:
        prompt["multi_modal_data"] = {"image": list(images)}
    return prompt


def to_vllm_sampling_kwargs(sp: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for one generate call."""
    kw: dict[str, Any] = {
        "max_tokens": sp.max_new_tokens,
        "temperature": 0.0 if sp.greedy else sp.temperature,
        "top_p": 1.0 if sp.greedy else sp.top_p,
        "top_k": -1 if sp.greedy or sp.top_k <= 0 else sp.top_k,
        "stop_token_ids": list(sp.stop_token_ids),
        "logprobs": 0,
        "detokenize": False,
        "skip_special_tokens": False,
    }
    if sp.seed is not None:
        kw["seed"] = sp.seed
    if sp.banned_token_ids:
        kw["logit_bias"] = {int(t): BANNED_LOGIT_BIAS for t in sp.banned_token_ids}
    return kw


def from_vllm_output(completion: Any) -> GenerateResult:
    """vLLM CompletionOutput (token_ids, logprobs: list of {id: Logprob}, finish_reason) -> ours."""
    ids = [int(t) for t in completion.token_ids]
    lps: list[float] = []
    for tok, entry in zip(ids, completion.logprobs or []):
        lp = entry[tok]
        lps.append(float(getattr(lp, "logprob", lp)))
    if len(lps) != len(ids):
        raise ValueError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens: request logprobs=0")
    reason = "stop" if completion.finish_reason == "stop" else "length"
    return GenerateResult(ids, lps, reason)


def weight_buckets(state_dict: dict[str, Any], bucket_bytes: int = WEIGHT_BUCKET_BYTES) -> Iterable[list[tuple[str, Any]]]:
    """(name, tensor) lists of at most bucket_bytes each (a larger tensor goes alone)."""
    bucket: list[tuple[str, Any]] = []
    size = 0
    for name, t in state_dict.items():
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


# ---------------------------------------------------------------------------------------------
# the worker side (runs inside vLLM's worker processes)


class WeightLoaderExtension:
    """vLLM worker extension: load named tensors into the running model."""

    def load_named_tensors(self, named: list[tuple[str, Any]]) -> int:
        device = next(self.model_runner.model.parameters()).device  # type: ignore[attr-defined]
        self.model_runner.model.load_weights(weights=[(n, t.to(device)) for n, t in named])  # type: ignore[attr-defined]
        return len(named)


# ---------------------------------------------------------------------------------------------
# the engine


class VLLMEngine:
    """vLLM AsyncLLM behind the Engine interface.

    Invariant: a weight load and generation never overlap (loads wait for in-flight requests,
    requests wait for a running load), so every sequence is sampled by one policy version.
    """

    def __init__(self, folder: Any, model_cfg: Any, rollout_cfg: Any, version: int = 0) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.version = version
        self.image_pad_id = _image_pad_id(folder)
        args = AsyncEngineArgs(
            model=str(folder), dtype=model_cfg.dtype, seed=rollout_cfg.seed,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            max_model_len=rollout_cfg.max_prompt_length + rollout_cfg.max_response_length,
            limit_mm_per_prompt={"image": rollout_cfg.max_assistant_turns * rollout_cfg.max_parallel_calls + 1},
            mm_processor_kwargs={"min_pixels": model_cfg.min_pixels, "max_pixels": model_cfg.max_pixels},
            enable_prefix_caching=True, logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.WeightLoaderExtension")
        self.engine = AsyncLLM.from_engine_args(args)
        self._ids = itertools.count()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()
        self.tokens_generated = 0

    async def generate(self, prompt_ids: list[int], images: list[Image.Image],
                       sampling: SamplingParams) -> GenerateResult:
        from vllm import SamplingParams as VSamplingParams

        await self._open.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            final = None
            async for out in self.engine.generate(to_vllm_prompt(prompt_ids, images, self.image_pad_id),
                                                  VSamplingParams(**to_vllm_sampling_kwargs(sampling)),
                                                  request_id=f"r{os.getpid()}-{next(self._ids)}"):
                final = out
            result = from_vllm_output(final.outputs[0])
            self.tokens_generated += len(result.token_ids)
            return result
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def load_weights(self, state_dict: dict[str, Any], version: int) -> None:
        self._open.clear()
        try:
            await self._idle.wait()
            for bucket in weight_buckets(state_dict):
                await self.engine.collective_rpc("load_named_tensors", args=(bucket,))
            await self.engine.reset_prefix_cache()
            self.version = version
        finally:
            self._open.set()


def _image_pad_id(folder: Any) -> int:
    import json
    from pathlib import Path

    return int(json.loads(Path(folder, "config.json").read_text())["image_token_id"])
