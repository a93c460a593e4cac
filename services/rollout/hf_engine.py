"""`HFEngine`: transformers on CPU or GPU with its own KV-cached decode loop, so that concurrent
episodes on a replica share one forward (dynamic batching) and each sequence keeps its own
sampling settings, seed and token cap. The interface it implements: engines.py (`Engine`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from deepeyes.config import ModelConfig, RolloutConfig
from deepeyes.images import image_key
from deepeyes.policy import Policy, load_policy, mrope_positions
from services.rollout.engines import GenerateResult, SamplingParams, hits_stop_string, sample_token


@dataclass
class _Pending:
    prompt_ids: list[int]
    images: list[Image.Image]
    sampling: SamplingParams
    future: asyncio.Future | None = None  # None: a synchronous caller collects the result


@dataclass
class _Row:
    """One sequence in the running decode."""

    req: _Pending
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: str = "length"
    done: bool = False
    error: BaseException | None = None

    def result(self) -> GenerateResult:
        return GenerateResult(self.tokens, self.logprobs, self.reason)


@dataclass
class _Live:
    """The decode state of the rows running together: KV cache, attention mask, next positions
    and each row's next-token logits, all in row order."""

    cache: Any
    attn: torch.Tensor      # (B, L) 0 over left padding
    next_pos: torch.Tensor  # (B, 1) the M-RoPE position of each row's next token
    logits: torch.Tensor    # (B, V) float32
    rows: list[_Row]


class HFEngine:
    """transformers engine with continuous batching.

    Requests that arrive while a decode runs join it at the next token step (their prompts are
    prefilled and their KV cache merged in, left-padded); finished rows leave at once. So a burst
    that trickles in over tens of milliseconds (requests from several Train workers) still decodes
    as one batch instead of one batch after another.

    Invariant: generation and weight loads never overlap (one lock guards the model; a pending
    load stops admissions, so the running decode drains), and a sequence yields the same tokens
    and log-probs (within float error) in any batch as alone: positions come from the model's
    own M-RoPE index over the unpadded tokens, padding is masked, and each sequence samples with
    its own torch.Generator (seeded from its request's seed). A request that breaks its prefill or
    its sampling fails alone.
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
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # peak rows per decode run
        self.joined = 0  # requests admitted into a decode already running
        self.prefill_shared = 0  # rows whose prompt forward another row of the same prefill ran
        self.tokens_generated = 0
        self.busy_s = 0.0  # wall time spent inside decodes (engine utilisation)
        self.decode_thread_cpu_s = 0.0  # CPU time of the decoding thread itself (busy_s minus waits)
        self.on_batch: Callable[[int], None] | None = None  # observer of each decode's peak rows (metrics)
        self._incoming: collections.deque[_Pending] = collections.deque()  # thread-safe append/popleft
        self._wake: asyncio.Event | None = None
        self._draining = False  # a weight load waits: admit nothing new
        self._worker: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None
        # Every decode and load runs on this one thread: torch's OpenMP team belongs to the thread
        # that calls it, and asyncio.to_thread's pool hands calls to ever other threads, each
        # with a team of its own (measured in a Serve replica: decode 1.7x slower than alone).
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hf-engine")

    # -- public API --------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], images: list[Image.Image],
                       sampling: SamplingParams) -> GenerateResult:
        """Queue one sequence: it starts the next decode or joins the running one."""
        self._ensure_worker()
        fut = asyncio.get_running_loop().create_future()
        self._incoming.append(_Pending(list(prompt_ids), list(images), sampling, fut))
        self._wake.set()
        return await fut

    async def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Copy a full state dict into the model between decodes (never during one)."""
        self._ensure_worker()
        self._draining = True  # the running decode admits no one new, so it ends
        try:
            async with self._lock:
                await asyncio.get_running_loop().run_in_executor(self._thread, self._load_sync, state_dict)
                self.version = version
        finally:
            self._draining = False
            self._wake.set()  # requests that arrived meanwhile

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
        """One batched generation of exactly these requests, synchronously; raises the first
        request's error if any failed."""
        pending = [_Pending(list(ids), list(ims), sp) for ids, ims, sp in requests]
        rows: dict[int, _Row] = {}
        with torch.inference_mode():
            self._run(pending, admit=None, deliver=lambda row: rows.__setitem__(id(row.req), row))
        out = [rows[id(p)] for p in pending]
        for row in out:
            if row.error is not None:
                raise row.error
        return [row.result() for row in out]

    # -- batching -----------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._lock = asyncio.Lock()
            self._worker = asyncio.get_running_loop().create_task(self._batch_loop())

    def _take(self, room: int) -> list[_Pending]:
        """Up to `room` queued requests (skipping ones whose caller gave up)."""
        taken: list[_Pending] = []
        while len(taken) < room and not self._draining:
            try:
                p = self._incoming.popleft()
            except IndexError:
                break
            if p.future is None or not p.future.done():
                taken.append(p)
        return taken

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._incoming or self._draining:
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(self.batch_wait_s)  # let a burst gather: one prefill for all of it
            async with self._lock:
                first = self._take(self.max_batch_size)
                if not first:
                    continue

                def deliver(row: _Row) -> None:  # from the decode thread
                    if row.error is None:
                        self.tokens_generated += len(row.tokens)
                    loop.call_soon_threadsafe(_resolve, row)

                t0 = time.perf_counter()
                try:
                    await loop.run_in_executor(self._thread, self._run_inference, first, deliver)
                finally:
                    self.busy_s += time.perf_counter() - t0

    def _run_inference(self, first: list[_Pending], deliver: Callable[[_Row], None]) -> int:
        cpu0 = time.thread_time()
        try:
            with torch.inference_mode():
                return self._run(first, admit=self._take, deliver=deliver)
        finally:
            self.decode_thread_cpu_s += time.thread_time() - cpu0

    def _load_sync(self, state_dict: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise ValueError(f"state dict does not match the rollout model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}; publish the policy's full state_dict()")

    # -- the decode loop ----------------------------------------------------------------------

    def _run(self, first: list[_Pending], admit: Callable[[int], list[_Pending]] | None,
             deliver: Callable[[_Row], None]) -> int:
        """Decode `first` and whoever `admit` lets in at each token step until no row is left;
        every row is handed to `deliver` once, when it is finished or failed. Returns the most
        rows that ran at once; it is counted (batch_sizes, on_batch) before the last rows are
        delivered, so a caller that sees its result also sees the count."""
        live: _Live | None = None
        new, peak = first, 0
        while True:
            finished: list[_Row] = []
            if new:
                joined = self._prefill_isolated(new, finished)
                if joined is not None:
                    if live is not None:
                        self.joined += len(joined.rows)
                    live = joined if live is None else self._merge(live, joined)
            step_ids = None
            if live is not None:
                peak = max(peak, len(live.rows))
                step_ids = self._sample(live)
                keep = [i for i, row in enumerate(live.rows) if not row.done]
                finished += [row for row in live.rows if row.done]
                if len(keep) < len(live.rows):
                    live = self._select(live, keep) if keep else None
                    step_ids = step_ids[keep]
            room = self.max_batch_size - (len(live.rows) if live is not None else 0)
            new = admit(room) if admit is not None and room > 0 else []
            if live is not None:
                try:
                    self._step(live, step_ids)
                except Exception as e:  # a failed shared forward fails every row in it
                    for row in live.rows:
                        row.error, row.done = e, True
                    finished += live.rows
                    live = None
            if live is None and not new:  # the decode ends with these deliveries
                if peak:
                    self._count(peak)
                for row in finished:
                    deliver(row)
                return peak
            for row in finished:
                deliver(row)

    def _count(self, peak: int) -> None:
        self.batch_sizes[peak] += 1
        if self.on_batch is not None:
            self.on_batch(peak)

    def _sample(self, live: _Live) -> torch.Tensor:
        """Each unfinished row samples its next token from its logits; (B, 1) ids to feed."""
        step_ids = torch.full((len(live.rows), 1), self.pad_id, dtype=torch.long)
        for b, row in enumerate(live.rows):
            sp = row.req.sampling
            try:
                tok, lp = sample_token(live.logits[b], sp, row.generator)
            except Exception as e:  # this row's settings broke its sampling: it alone fails
                row.error, row.done = e, True
                continue
            row.tokens.append(tok)
            row.logprobs.append(lp)
            step_ids[b, 0] = tok
            if tok in sp.stop_token_ids or (sp.stop_strings and hits_stop_string(
                    self.policy.tokenizer, row.tokens, sp.stop_strings)):
                row.reason, row.done = "stop", True
            elif len(row.tokens) >= sp.max_new_tokens:
                row.done = True
        return step_ids

    def _prefill_isolated(self, reqs: list[_Pending], finished: list[_Row]) -> _Live | None:
        """The prefill of `reqs` together; if that raises, each alone, so that a request that
        breaks it fails by itself. Failed rows, and rows with nothing to generate, go to
        `finished`."""
        ready = []
        for p in reqs:
            seed = p.sampling.seed if p.sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            row = _Row(p, torch.Generator().manual_seed(seed))
            if p.sampling.max_new_tokens <= 0:
                row.done = True
                finished.append(row)
            else:
                ready.append(row)
        if not ready:
            return None
        try:
            return self._prefill(ready)
        except Exception as e:
            if len(ready) == 1:
                ready[0].error, ready[0].done = e, True
                finished.append(ready[0])
                return None
        live = None
        for row in ready:
            try:
                one = self._prefill([row])
            except Exception as e:
                row.error, row.done = e, True
                finished.append(row)
                continue
            live = one if live is None else self._merge(live, one)
        return live

    def _prefill(self, rows: list[_Row]) -> _Live:
        """One forward over the rows' prompts. Rows with the same prompt (ids and images: the n
        samples of one GRPO prompt) share it: the prompt runs once and its cache, mask, position
        and logits are copied to each (whole-prompt prefix caching, as vLLM shares prefix blocks)."""
        first: dict[tuple[Any, ...], int] = {}
        where = [first.setdefault(_prompt_key(r.req), len(first)) for r in rows]
        if len(first) == len(rows):
            return self._prefill_rows(rows)
        unique = [rows[where.index(i)] for i in range(len(first))]
        self.prefill_shared += len(rows) - len(unique)
        live = self._prefill_rows(unique)
        idx = torch.tensor(where, dtype=torch.long, device=live.attn.device)
        for layer in live.cache.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        return _Live(live.cache, live.attn[idx], live.next_pos[idx], live.logits[idx], list(rows))

    def _prefill_rows(self, rows: list[_Row]) -> _Live:
        dev = self.device
        B = len(rows)
        L = max(len(r.req.prompt_ids) for r in rows)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, row in enumerate(rows):  # LEFT padding: every row's next token is at L
            ids = row.req.prompt_ids
            input_ids[b, L - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attn[b, L - len(ids):] = 1
        all_images = [im for row in rows for im in row.req.images]
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
        return _Live(out.past_key_values, attn, next_pos, out.logits[:, -1].float(), list(rows))

    def _step(self, live: _Live, step_ids: torch.Tensor) -> None:
        """One token for every row (finished rows have left already)."""
        dev = self.device
        B = len(live.rows)
        live.attn = torch.cat([live.attn, torch.ones((B, 1), dtype=live.attn.dtype, device=dev)], dim=1)
        pos = live.next_pos.view(1, B, 1).expand(3, B, 1)
        out = self.model(input_ids=step_ids.to(dev), attention_mask=live.attn, position_ids=pos,
                         past_key_values=live.cache, use_cache=True)
        live.cache = out.past_key_values
        live.logits = out.logits[:, -1].float()
        live.next_pos = live.next_pos + 1

    @staticmethod
    def _select(live: _Live, keep: list[int]) -> _Live:
        idx = torch.tensor(keep, dtype=torch.long, device=live.attn.device)
        for layer in live.cache.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        return _Live(live.cache, live.attn[idx], live.next_pos[idx], live.logits[idx], [live.rows[i] for i in keep])

    @staticmethod
    def _merge(a: _Live, b: _Live) -> _Live:
        """Rows of `b` join `a`: caches and masks left-padded to one length, then stacked."""
        length = max(a.attn.shape[1], b.attn.shape[1])

        def left_pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - x.shape[dim]
            if missing == 0:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.keys = torch.cat([left_pad(la.keys, -2), left_pad(lb.keys, -2)], dim=0)
            la.values = torch.cat([left_pad(la.values, -2), left_pad(lb.values, -2)], dim=0)
        attn = torch.cat([left_pad(a.attn, 1), left_pad(b.attn, 1)], dim=0)
        return _Live(a.cache, attn, torch.cat([a.next_pos, b.next_pos]), torch.cat([a.logits, b.logits]),
                     a.rows + b.rows)


def _prompt_key(req: _Pending) -> tuple[Any, ...]:
    """What makes two prompts the same forward: their ids and their images' pixels."""
    return tuple(req.prompt_ids), tuple(image_key(im) for im in req.images)


def _resolve(row: _Row) -> None:
    """Hand a finished row to its waiting caller (on the event loop)."""
    fut = row.req.future
    if fut is None or fut.done():
        return
    if row.error is not None:
        fut.set_exception(row.error)
    else:
        fut.set_result(row.result())


def load_hf_engine(folder: str | os.PathLike[str], model_cfg: ModelConfig, rollout_cfg: RolloutConfig,
                   device: str = "cpu") -> HFEngine:
    """An HFEngine on the policy folder, with the config's pixel frame and batching settings."""
    policy = load_policy(folder, device=device, dtype=model_cfg.dtype,
                         min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels,
                         attn_implementation=model_cfg.attn_implementation)
    return HFEngine(policy, max_batch_size=rollout_cfg.max_batch_size,
                    batch_wait_ms=rollout_cfg.batch_wait_ms)
