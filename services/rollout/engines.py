"""Generation engines behind one interface: token ids + images in, sampled ids + log-probs out.

This room holds the interface (`Engine`, `SamplingParams`, `GenerateResult`, the sampling checks)
and the sampling of one row. The engines: `HFEngine` (hf_engine.py: transformers on CPU or GPU
with its own KV-cached, dynamically batched decode loop) and `VLLMEngine` (vllm_engine.py).

Sampling log-probs are `log_softmax(logits / T)` at the chosen token, with T the temperature
actually used (1.0 for greedy) and before top-k/top-p filtering: the same quantity
`services.rollout.logprobs.sequence_logprobs(..., temperature=T)` recomputes in the trainer.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from PIL import Image

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
    stop_strings: list[str] = field(default_factory=list)  # end the turn once the text holds one (kept)

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
    finish_reason: str  # "stop" (a stop token or stop string) | "length" (max_new_tokens reached)


STOP_WINDOW_TOKENS = 16  # tokens decoded to look for a stop string (each is at most a few tokens long)


def hits_stop_string(tokenizer: object, tokens: list[int], stop_strings: list[str]) -> bool:
    """Whether the text of the last tokens holds a stop string (checked after every sampled token,
    so the first token that completes one ends the turn; that token is kept, as vLLM's
    include_stop_str_in_output keeps it)."""
    tail = tokenizer.decode(tokens[-STOP_WINDOW_TOKENS:], skip_special_tokens=False)  # type: ignore[attr-defined]
    return any(s in tail for s in stop_strings)


class Engine(Protocol):
    """What the rollout worker needs from a generation engine, and the counters it reports.

    The counters are read by the replica's `stats()` and metrics, and by the trainer through the
    trajectories' `engine_stamp` (busy_s: the rollout idle share). An engine without batched
    decodes keeps `batch_sizes`, `joined`, `prefill_shared` and `decode_thread_cpu_s` at zero.
    """

    version: int
    busy_s: float  # wall seconds spent generating
    tokens_generated: int
    batch_sizes: collections.Counter[int]  # peak rows per batched decode
    joined: int  # requests admitted into a decode already running
    prefill_shared: int  # rows whose prompt forward another row of the same prefill ran
    decode_thread_cpu_s: float  # CPU seconds of the decoding thread
    on_batch: Callable[[int], None] | None  # called with each batched decode's peak rows (metrics)

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
