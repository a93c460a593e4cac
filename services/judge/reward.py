"""The DeepEyes reward: answer extraction, the format rule and the score formula (one place).

Pure functions, no Ray, no I/O. `services/judge/scoring.py` adds the judge call around them.

    score = acc_weight * acc + format_weight * fmt + tool_weight * tool     (0.8, 0.2, 1.2)

- acc in {0, 1}: the judge's verdict (or the math checker's) on the extracted answer; an answer of
  `max_answer_chars` (1000) characters or more scores acc=0 and is a format error (length hacking).
- fmt = -1 on a format error, else 0. Format errors: `<think>` and `</think>` counts differ;
  after the last `</think>`, `<answer>` and `</answer>` counts differ; no answer tags there.
- tool = 1 only if acc = 1 and a tool was used: `call` = any tool call was made (verl port),
  `crop` = at least one crop came back (DeepEyes original, the default).

Possible scores: -0.2, 0, 0.6, 0.8, 1.8, 2.0.

judge.reward=deepeyes_v2 (DeepEyesV2's rule, its reward code read for the facts):

    score = acc_weight * acc * (search_factor if a search ran else 1) + format_weight * fmt
            + tool_weight * tool                                   (0.8, 0.9, 0.2; tool_weight 0)

- fmt = 1 when the format holds, else 0; the format also needs as many `<code>` as `</code>` and
  `<tool_call>` as `</tool_call>`, and a response that does not open with `<think>` is read as if
  it did (DeepEyesV2 prefixes one); the answer cap is the recipe's max_answer_chars (300).
- the tool bonus, computed but never added in DeepEyesV2, is off (tool_weight 0); a run without a
  cold start may opt in with tool_weight > 0 and tool_bonus_min_acc 0.5.

Multiple answers: when the text after the last `</think>` holds several complete
`<answer>...</answer>` pairs, the LAST one is the answer (as in the DeepEyes original, which splits
on the last `<answer>`). Balanced repeated pairs are not a format error (the rule only compares
counts, as the original does); an unclosed or unopened extra tag is one, because the counts differ.
"""

from __future__ import annotations

import re
from typing import Any

from deepeyes.config import JudgeConfig
from deepeyes.contracts import RewardResult, ScoreRequest

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
CODE_OPEN, CODE_CLOSE = "<code>", "</code>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# ChatML end markers may trail a decoded response; they are never part of an answer.
_CHAT_MARKERS = re.compile(r"<\|im_end\|>|<\|endoftext\|>|<\|im_start\|>(assistant|user)?")


def _after_last_think(text: str) -> str:
    i = text.rfind(THINK_CLOSE)
    return text if i < 0 else text[i + len(THINK_CLOSE):]


def _last_answer_pair(tail: str) -> str | None:
    """The content of the last `<answer>...</answer>` pair, pairs taken left to right, each
    `<answer>` closed by the first `</answer>` after it (what `<answer>(.*?)</answer>` finds).
    str.find keeps it linear: the regular expression rescanned the rest of the text from every
    unclosed `<answer>` (quadratic; 256 KB of them took 38 s)."""
    last, pos = None, 0
    while (start := tail.find(ANSWER_OPEN, pos)) >= 0:
        end = tail.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end < 0:
            break
        last, pos = tail[start + len(ANSWER_OPEN):end], end + len(ANSWER_CLOSE)
    return last


def extract_answer(text: str) -> str | None:
    """The answer the model gave: the content of `<answer>` after the last `</think>`.

    In order: the last complete `<answer>...</answer>` pair; an `<answer>` left open (the text to
    the end); a `</answer>` with no opening (the text before it); no tags at all (the whole text
    after the last `</think>`, as the DeepEyes original judges it). The fallbacks still count as
    format errors (see `format_error`). Returns None when nothing is left to judge.
    """
    tail = _after_last_think(text)
    answer = _last_answer_pair(tail)
    if answer is None:
        if ANSWER_OPEN in tail:
            answer = tail.rsplit(ANSWER_OPEN, 1)[1]
        elif ANSWER_CLOSE in tail:
            answer = tail.split(ANSWER_CLOSE, 1)[0]
        else:
            answer = tail
    answer = _CHAT_MARKERS.sub("", answer).strip()
    return answer or None


def format_error(text: str) -> bool:
    """True when the tags break the DeepEyes format rule (the length rule is applied in scoring)."""
    if text.count(THINK_OPEN) != text.count(THINK_CLOSE):
        return True
    tail = _after_last_think(text)
    opened, closed = tail.count(ANSWER_OPEN), tail.count(ANSWER_CLOSE)
    return opened != closed or opened == 0


def format_error_v2(text: str) -> bool:
    """The DeepEyesV2 format rule (see the module docstring)."""
    if not text.startswith(THINK_OPEN):
        text = THINK_OPEN + text
    if text.count(CODE_OPEN) != text.count(CODE_CLOSE) or text.count(CALL_OPEN) != text.count(CALL_CLOSE):
        return True
    return format_error(text) or text.count(THINK_CLOSE) == 0


def read_format(text: str, cfg: JudgeConfig) -> bool:
    """The format error flag under cfg.reward's rule."""
    return format_error_v2(text) if cfg.reward == "deepeyes_v2" else format_error(text)


def format_value(fmt_error: bool, cfg: JudgeConfig) -> float:
    """fmt of the formula: 0/-1 (deepeyes) or 1/0 (deepeyes_v2)."""
    if cfg.reward == "deepeyes_v2":
        return 0.0 if fmt_error else 1.0
    return -1.0 if fmt_error else 0.0


def had_format_error(result: RewardResult, cfg: JudgeConfig) -> bool:
    """Read the format flag back from a result's fmt."""
    return result.format == format_value(True, cfg)


def searched(request: ScoreRequest, cfg: JudgeConfig) -> bool:
    """Whether the episode ran one of cfg.search_tools (deepeyes_v2 scales acc down then)."""
    return any(name in cfg.search_tools for name in request.tools_used)


def tool_used(request: ScoreRequest, cfg: JudgeConfig) -> bool:
    """Whether the episode used a tool, by cfg.tool_used (`call` or `crop`)."""
    return request.tool_calls > 0 if cfg.tool_used == "call" else request.crops > 0


def combine(acc: float, fmt_error: bool, used_tool: bool, cfg: JudgeConfig, *, search: bool = False,
            **extra: Any) -> RewardResult:
    """The formula (cfg.reward): acc, the format flag, tool use and (deepeyes_v2) whether a search
    ran -> RewardResult (extra fields passed on)."""
    fmt = format_value(fmt_error, cfg)
    acc_term = acc * (cfg.search_factor if (search and cfg.reward == "deepeyes_v2") else 1.0)
    tool = 1.0 if (acc >= cfg.tool_bonus_min_acc and used_tool) else 0.0
    score = cfg.acc_weight * acc_term + cfg.format_weight * fmt + cfg.tool_weight * tool
    return RewardResult(score=score, acc=acc, format=fmt, tool=tool, **extra)


def failed(fmt_error: bool, cause: str, cfg: JudgeConfig | None = None, **extra: Any) -> RewardResult:
    """A result without a verdict: NaN score/acc/tool, judge_ok=False, the cause named."""
    nan = float("nan")
    fmt = format_value(fmt_error, cfg) if cfg is not None else (-1.0 if fmt_error else 0.0)
    return RewardResult(score=nan, acc=nan, format=fmt, tool=nan, judge_ok=False, failure=cause, **extra)
