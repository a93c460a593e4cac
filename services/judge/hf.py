"""The `hf` judge backend: a local transformers causal LM, and the tiny text model for tests.

`judge.hf_model_path=tiny-text` builds (once, cached like the tiny policy) a random-init
Qwen2ForCausalLM of about 0.3M parameters on the project's tiny tokenizer; any other value is a
causal-LM folder loaded with `from_pretrained`. Requests are batched: while one `generate` runs,
new requests queue and go together into the next one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

from deepeyes.config import DEFAULT_CACHE_DIR, JudgeConfig
from services.judge.backends import ChatJudge

TINY_TEXT_VERSION = "tiny-text-judge-v2"  # v2: head size 32 (vLLM CPU attention needs >= 32)


def build_tiny_text_model(folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny random-init Qwen2ForCausalLM with the project's tiny tokenizer."""
    import torch  # torch: only the hf backend computes here
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from deepeyes.policy import build_tiny_tokenizer

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer(seed)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=((len(tokenizer) + 63) // 64) * 64, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_text_model_path(cache_dir: str = DEFAULT_CACHE_DIR, seed: int = 0) -> Path:
    """The cached tiny text model folder, built on first use."""
    from deepeyes.policy import build_cached  # deepeyes.policy pulls transformers: only the hf judge

    key = hashlib.sha1(f"{TINY_TEXT_VERSION}-{seed}".encode()).hexdigest()[:10]
    return build_cached(cache_dir, f"tiny-text-{key}", lambda tmp: build_tiny_text_model(tmp, seed))


class HFGenerator:
    """Chat completion with a local causal LM; concurrent requests are batched (left padding)."""

    def __init__(self, path: str | os.PathLike[str], max_batch: int = 32) -> None:
        import torch  # torch: only the hf backend computes here
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        self.max_batch = max_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.generate_calls = 0

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _generate_batch(self, prompts: list[str], max_tokens: int,
                        temperature: float) -> list[tuple[str, int, int, str]]:
        import torch  # torch: only the hf backend computes here

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        sample = temperature > 0
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=sample,
                                      temperature=temperature if sample else None, top_p=None,
                                      top_k=None, pad_token_id=self.tokenizer.pad_token_id)
        self.generate_calls += 1
        width = enc["input_ids"].shape[1]
        eos = self.model.generation_config.eos_token_id
        eos = torch.tensor(eos if isinstance(eos, list) else [eos])
        results = []
        for i in range(len(prompts)):
            new = out[i, width:]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            prompt_tokens = int(enc["attention_mask"][i].sum())
            # OpenAI's finish_reason: "stop" when the model ended it, "length" when max_tokens cut it
            finish = "stop" if bool(torch.isin(new, eos).any()) else "length"
            results.append((text, prompt_tokens, int((new != self.tokenizer.pad_token_id).sum()), finish))
        return results

    def worker_error(self) -> BaseException | None:
        """The exception the batching worker died of (None while it runs, or before its start)."""
        w = self._worker
        return w.exception() if w is not None and w.done() and not w.cancelled() else None

    async def generate(self, messages: list[dict[str, str]], max_tokens: int,
                       temperature: float) -> tuple[str, int, int, str]:
        """-> (text, prompt tokens, completion tokens, finish reason: "stop" or "length")."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((self.render(messages), max_tokens, temperature, fut))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # One generate per (max_tokens, temperature): requests in a batch share both.
            groups: dict[tuple[int, float], list[Any]] = {}
            for item in batch:
                groups.setdefault((item[1], item[2]), []).append(item)
            for (max_tokens, temperature), items in groups.items():
                try:
                    results = await asyncio.to_thread(self._generate_batch, [it[0] for it in items],
                                                      max_tokens, temperature)
                except Exception as e:  # hand the error to every waiter; the worker lives on
                    for it in items:
                        if not it[3].done():
                            it[3].set_exception(e)
                    continue
                for it, res in zip(items, results):
                    if not it[3].done():
                        it[3].set_result(res)


def resolve_hf_path(cfg: JudgeConfig, cache_dir: str) -> Path:
    if cfg.hf_model_path == "tiny-text":
        return tiny_text_model_path(cache_dir)
    path = Path(os.path.expanduser(cfg.hf_model_path))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"judge.hf_model_path={cfg.hf_model_path}: no model folder there "
                                f"(config.json missing); use a causal-LM folder or 'tiny-text'")
    return path


class HFJudge(ChatJudge):
    """The `hf` backend: the judge prompt through a local causal LM (see HFGenerator)."""

    name = "hf"

    def __init__(self, cfg: JudgeConfig, cache_dir: str = DEFAULT_CACHE_DIR) -> None:
        super().__init__(cfg)
        self.generator = HFGenerator(resolve_hf_path(cfg, cache_dir), max_batch=max(1, cfg.concurrency))

    async def complete(self, messages: list[dict[str, str]]) -> str:
        self.calls += 1
        text, *_ = await self.generator.generate(messages, self.cfg.max_tokens, self.cfg.temperature)
        return text
