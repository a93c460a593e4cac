"""Generation engines behind one interface: token ids + images in, sampled ids + log-probs out.

`HFEngine` runs transformers on CPU or GPU with its own KV-cached decode loop, so that concurrent
episodes on a replica share one forward (dynamic batching) and each sequence keeps its own
sampling settings, seed and token cap. `VLLMEngine` (vllm_engine.py) is the GPU engine.

Sampling log-probs are `log_softmax(logits / T)` at the chosen token, with T the temperature
actually used (1.0 for greedy) and before top-k/top-p filtering: the same quantity
`services.rollout.logprobs.sequence_logprobs(..., temperature=T)` recomputes in the trainer.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from PIL import Image

from deepeyes.config import ModelConfig, RolloutConfig
from deepeyes.policy import Policy, load_policy, mrope_positions


MIN_TEMPERATURE = 1e-2  # below it sampling is argmax in practice (and 1e-320 makes logits / T inf): use 0
MAX_TEMPERATURE = 10.0  # above it the sample is noise
SEED_LIMIT = 2**64      # torch.Generator.manual_seed takes seeds in [0, 2**64)


def check_sampling(temperature: float, seed: int | None, seed_limit: int = SEED_LIMIT) -> None:
    """Raises ValueError unless temperature is 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]
    and seed is None or in [0, seed_limit): the one rule for every boundary (HTTP body, episode
    request, engine call), so a bad value is refused there instead of failing a batched decode."""
    if not (temperature == 0.0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):  # NaN fails both
        raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                         f"got {temperature!r}")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < seed_limit):
        raise ValueError(f"seed must be an integer in [0, {seed_limit}), got {seed!r}")


@dataclass
class SamplingParams:
    """Sampling settings of one generate call. temperature 0 = greedy (check_sampling on creation)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    banned_token_ids: list[int] = field(default_factory=list)  # never sampled (e.g. <|image_pad|>)

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class GenerateResult:
    """Sampled ids (stop token included when hit), their log-probs, and why generation ended."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token was sampled) | "length" (max_new_tokens reached)


class Engine(Protocol):
    """What the rollout worker needs from a generation engine."""

    version: int

    async def generate(self, prompt_ids: list[int], images: list[Image.Image],
                       sampling: SamplingParams) -> GenerateResult: ...

    async def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...

    async def check_health(self) -> None: ...  # raises when the engine can no longer generate


# ---------------------------------------------------------------------------------------------
# sampling of one row


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside top-k and the top-p nucleus with -inf (1-D logits)."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample_token(logits: torch.Tensor, sp: SamplingParams,
                 generator: torch.Generator | None) -> tuple[int, float]:
    """One token from 1-D float32 logits; returns (token, log-prob under logits / T).

    Banned ids are removed like top-k removes tokens: from the choice, not from the log-prob.
    """
    choice = logits
    if sp.banned_token_ids:
        choice = logits.clone()
        choice[sp.banned_token_ids] = float("-inf")
    if sp.greedy:
        lp = torch.log_softmax(logits, dim=-1)
        tok = int(torch.argmax(choice))
        return tok, float(lp[tok])
    lp = torch.log_softmax(logits / sp.temperature, dim=-1)
    probs = torch.softmax(_filter_top_k_top_p(choice / sp.temperature, sp.top_k, sp.top_p), dim=-1)
    tok = int(torch.multinomial(probs.cpu(), 1, generator=generator))
    return tok, float(lp[tok])


# ---------------------------------------------------------------------------------------------
# the HF engine


@dataclass
class _Pending:
    prompt_ids: list[int]
    images: list[Image.Image]
    sampling: SamplingParams
    future: asyncio.Future


class HFEngine:
    """transformers engine with dynamic batching.

    Invariant: generation and weight loads never overlap (one lock guards the model), and a batch
    of left-padded sequences yields the same tokens and log-probs (within float error) as each
    sequence alone: positions come from the model's own M-RoPE index over the unpadded tokens,
    and each sequence samples with its own torch.Generator (seeded from its request's seed).
    """

    def __init__(self, policy: Policy, *, max_batch_size: int = 32, batch_wait_ms: float = 5.0,
                 version: int = 0) -> None:
        self.policy = policy
        self.model = policy.model
        self.device = next(self.model.parameters()).device
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.version = version
        self.pad_id = policy.pad_id
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.tokens_generated = 0
        self.busy_s = 0.0  # wall time spent inside batched decodes (engine utilisation)
        self.on_batch: Callable[[int], None] | None = None  # observer of each batch's size (metrics)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None

    # -- public API --------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], images: list[Image.Image],
                       sampling: SamplingParams) -> GenerateResult:
        """Queue one sequence; it joins the next batch (wait window batch_wait_ms)."""
        self._ensure_worker()
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(list(prompt_ids), list(images), sampling, fut))
        return await fut

    async def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Copy a full state dict into the model between batches (never during one)."""
        self._ensure_worker()
        async with self._lock:
            await asyncio.to_thread(self._load_sync, state_dict)
            self.version = version

    def load_state_sync(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """load_weights for callers without an event loop (a replica's constructor); no batch runs yet."""
        self._load_sync(state_dict)
        self.version = version

    async def check_health(self) -> None:
        """Raises when the batch worker died with an exception (requests would wait for nothing
        until the next generate restarts it); the replica's check_health calls this."""
        w = self._worker
        if w is not None and w.done() and not w.cancelled() and w.exception() is not None:
            raise RuntimeError(f"hf engine batch worker died: {w.exception()!r}")

    def generate_batch_sync(self, requests: Sequence[tuple[list[int], list[Image.Image], SamplingParams]]
                            ) -> list[GenerateResult]:
        """One batched generation, synchronously (what the batcher runs in a worker thread)."""
        with torch.inference_mode():
            return self._decode(list(requests))

    # -- batching -----------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._lock = asyncio.Lock()
            self._worker = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _batch_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            async with self._lock:
                t0 = time.perf_counter()
                try:
                    results = await self._run_isolated(batch)
                finally:
                    self.busy_s += time.perf_counter() - t0
            self.batch_sizes[len(batch)] += 1
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for p, r in zip(batch, results):
                if p.future.done():
                    continue
                if isinstance(r, BaseException):
                    p.future.set_exception(r)
                else:
                    self.tokens_generated += len(r.token_ids)
                    p.future.set_result(r)

    async def _run_isolated(self, batch: list[_Pending]) -> list[GenerateResult | Exception]:
        """The batch in one decode; if that raises, each request alone, so that a request that
        breaks the decode fails by itself and never its batch mates (the good path stays batched)."""
        try:
            return await asyncio.to_thread(
                self.generate_batch_sync, [(p.prompt_ids, p.images, p.sampling) for p in batch])
        except Exception as e:
            if len(batch) == 1:
                return [e]
        out: list[GenerateResult | Exception] = []
        for p in batch:
            try:
                out += await asyncio.to_thread(self.generate_batch_sync, [(p.prompt_ids, p.images, p.sampling)])
            except Exception as e:
                out.append(e)
        return out

    def _load_sync(self, state_dict: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise ValueError(f"state dict does not match the rollout model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}; publish the policy's full state_dict()")

    # -- the decode loop ----------------------------------------------------------------------

    def _decode(self, reqs: list[tuple[list[int], list[Image.Image], SamplingParams]]) -> list[GenerateResult]:
        dev = self.device
        B = len(reqs)
        L = max(len(r[0]) for r in reqs)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, (ids, _, _) in enumerate(reqs):  # LEFT padding: every row's next token is at L
            input_ids[b, L - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attn[b, L - len(ids):] = 1
        all_images = [im for _, ims, _ in reqs for im in ims]
        pixel_values = grid = None
        if all_images:
            proc = self.policy.image_processor(images=all_images, return_tensors="pt")
            pixel_values = proc["pixel_values"].to(dev, self.model.dtype)
            grid = proc["image_grid_thw"].to(dev)
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        position_ids, deltas = mrope_positions(self.model, input_ids, attn, grid)
        next_pos = (attn.sum(-1, keepdim=True) + deltas.to(dev)).long()  # (B, 1)

        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                         pixel_values=pixel_values, image_grid_thw=grid, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        gens = []
        for _, _, sp in reqs:
            seed = sp.seed if sp.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            gens.append(torch.Generator().manual_seed(seed))
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        done = [r[2].max_new_tokens <= 0 for r in reqs]
        while True:
            logits = out.logits[:, -1].float()
            step_ids = torch.full((B, 1), self.pad_id, dtype=torch.long)
            for b, (_, _, sp) in enumerate(reqs):
                if done[b]:
                    continue
                tok, lp = sample_token(logits[b], sp, gens[b])
                toks[b].append(tok)
                lps[b].append(lp)
                step_ids[b, 0] = tok
                if tok in sp.stop_token_ids:
                    reasons[b], done[b] = "stop", True
                elif len(toks[b]) >= sp.max_new_tokens:
                    done[b] = True
            if all(done):
                break
            # Finished rows still ride along (a pad token) so the batch keeps its shape.
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=dev)], dim=1)
            pos = next_pos.view(1, B, 1).expand(3, B, 1)
            out = self.model(input_ids=step_ids.to(dev), attention_mask=attn, position_ids=pos,
                             past_key_values=out.past_key_values, use_cache=True)
            next_pos = next_pos + 1
        return [GenerateResult(toks[b], lps[b], reasons[b]) for b in range(B)]


def load_hf_engine(folder: str | os.PathLike[str], model_cfg: ModelConfig, rollout_cfg: RolloutConfig,
                   device: str = "cpu") -> HFEngine:
    """An HFEngine on the policy folder, with the config's pixel frame and batching settings."""
    policy = load_policy(folder, device=device, dtype=model_cfg.dtype,
                         min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels,
                         attn_implementation=model_cfg.attn_implementation)
    return HFEngine(policy, max_batch_size=rollout_cfg.max_batch_size,
                    batch_wait_ms=rollout_cfg.batch_wait_ms)
