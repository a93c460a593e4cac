"""The DeepEyes reward: every possible value, tool definitions, format rules, math rows, cache.

Golden scores are computed by hand from the formula 0.8*acc + 0.2*fmt + 1.2*tool.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from deepeyes.config import JudgeConfig
from services.judge.backends import RuleJudge, Verdict
from services.judge.reward import RewardResult, ScoreRequest, extract_answer, format_error
from services.judge.scoring import JudgeFailure, VerdictCache, apply_failure_policy, score, stats

pytestmark = pytest.mark.timeout(60)

QUESTION = "What word is written on the shop sign above the door?"
TRUTH = "BAKERY"

CALL = ('<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 12, 120, 96], '
        '"label": "shop sign"}}\n</tool_call><|im_end|>\n')
OBS_OK = ("<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>\n"
          "Zoomed in on [10, 12, 120, 96] (shop sign).\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
OBS_ERR = ("<|im_start|>user\n<tool_response>\nError: bbox_2d [10, 12, 11, 13] is below 28x28 after "
           "expansion.\n</tool_response><|im_end|>\n<|im_start|>assistant\n")

# two turns with a crop, a clean final answer
TOOL_RIGHT = ("<think>The sign is small and far away; zoom in on the top-left.</think>\n" + CALL + OBS_OK +
              "<think>The zoomed sign reads BAKERY in capitals.</think>\n<answer>Bakery</answer><|im_end|>")
TOOL_WRONG = TOOL_RIGHT.replace("<answer>Bakery</answer>", "<answer>BUTCHER</answer>")
# the first turn opens <think> and never closes it: counts differ
TOOL_RIGHT_BADTHINK = TOOL_RIGHT.replace("zoom in on the top-left.</think>", "zoom in on the top-left.")
NO_TOOL_RIGHT = "<think>I can read the sign directly: BAKERY.</think>\n<answer>BAKERY</answer><|im_end|>"
NO_TOOL_NOTAGS = "<think>I can read the sign directly.</think>\nBakery<|im_end|>"
NO_TOOL_WRONG_NOTAGS = "<think>I can read the sign directly.</think>\nIt is a butcher<|im_end|>"
NO_TOOL_WRONG = "<think>It looks like a butcher.</think>\n<answer>butcher</answer><|im_end|>"


def req(text: str, tool_calls: int = 0, crops: int = 0, **kw) -> ScoreRequest:
    return ScoreRequest(response_text=text, question=kw.pop("question", QUESTION),
                        ground_truth=kw.pop("ground_truth", TRUTH), tool_calls=tool_calls, crops=crops, **kw)


def run(coro):
    return asyncio.run(coro)


class ScriptedJudge:
    """Test double for an LLM judge (no LLM runs here): returns scripted verdicts, counts calls."""

    def __init__(self, verdict: Verdict | None = None, delay: float = 0.0) -> None:
        self.verdict = verdict
        self.delay = delay
        self.calls: list[tuple[str, str, str]] = []

    async def judge(self, question: str, reference: str, answer: str) -> Verdict:
        self.calls.append((question, reference, answer))
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.verdict or Verdict(correct=answer.lower() == reference.lower(), ok=True, raw="x")

    def stats(self) -> dict:
        return {"calls": len(self.calls)}


# --- every value -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,tool_calls,crops,expected", [
    (TOOL_RIGHT, 1, 1, 2.0),            # acc 1, tool 1, fmt 0: 0.8 + 1.2
    (TOOL_RIGHT_BADTHINK, 1, 1, 1.8),   # acc 1, tool 1, fmt -1: 0.8 - 0.2 + 1.2
    (NO_TOOL_RIGHT, 0, 0, 0.8),         # acc 1 only
    (NO_TOOL_NOTAGS, 0, 0, 0.6),        # acc 1 (fallback extraction), no answer tags: 0.8 - 0.2
    (TOOL_WRONG, 1, 1, 0.0),            # wrong: no tool bonus either
    (NO_TOOL_WRONG_NOTAGS, 0, 0, -0.2), # wrong and no answer tags
])
def test_every_reward_value(text, tool_calls, crops, expected):
    r = run(score(req(text, tool_calls, crops), RuleJudge(), JudgeConfig()))
    assert r.score == pytest.approx(expected)
    assert r.judge_ok


def test_reward_parts_are_separate():
    r = run(score(req(TOOL_RIGHT_BADTHINK, 1, 1), RuleJudge(), JudgeConfig()))
    assert (r.acc, r.format, r.tool) == (1.0, -1.0, 1.0)
    assert r.answer == "Bakery"
    d = r.to_dict()
    assert set(d) == {"score", "acc", "format", "tool", "judge_ok", "failure", "answer", "cached", "judge_latency_s", "drop"}


def test_tool_definitions_call_vs_crop():
    # The call was made but the crop failed (error text, no image came back).
    text = "<think>Zoom.</think>\n" + CALL + OBS_ERR + "<think>Still readable.</think>\n<answer>BAKERY</answer>"
    request = req(text, tool_calls=1, crops=0)
    crop = run(score(request, RuleJudge(), JudgeConfig(tool_used="crop")))
    call = run(score(request, RuleJudge(), JudgeConfig(tool_used="call")))
    assert crop.score == pytest.approx(0.8) and crop.tool == 0.0
    assert call.score == pytest.approx(2.0) and call.tool == 1.0


def test_default_tool_definition_is_crop():
    assert JudgeConfig().tool_used == "crop"


def test_weights_come_from_config():
    cfg = JudgeConfig(acc_weight=1.0, format_weight=0.5, tool_weight=0.0)
    r = run(score(req(TOOL_RIGHT_BADTHINK, 1, 1), RuleJudge(), cfg))
    assert r.score == pytest.approx(1.0 - 0.5)


# --- long answers ------------------------------------------------------------------------------

def test_long_answer_is_acc0_and_format_error_without_judging():
    long = "x" * 1000
    judge = ScriptedJudge(Verdict(True, True))
    r = run(score(req(f"<think>t</think><answer>{long}</answer>", ground_truth=long), judge, JudgeConfig()))
    assert (r.acc, r.format, r.score) == (0.0, -1.0, pytest.approx(-0.2))
    assert judge.calls == []


def test_answer_just_under_the_limit_is_judged():
    ans = "y" * 999
    r = run(score(req(f"<think>t</think><answer>{ans}</answer>", ground_truth=ans), RuleJudge(), JudgeConfig()))
    assert r.score == pytest.approx(0.8)


# --- tags --------------------------------------------------------------------------------------

def test_extract_answer_after_last_think():
    text = "<answer>A</answer><think>no, wait</think><answer>B</answer>"
    assert extract_answer(text) == "B"


def test_multiple_answer_pairs_last_counts_and_no_format_error():
    text = "<think>t</think><answer>BUTCHER</answer> hmm, actually <answer>BAKERY</answer>"
    assert extract_answer(text) == "BAKERY"
    assert not format_error(text)
    assert run(score(req(text), RuleJudge(), JudgeConfig())).score == pytest.approx(0.8)


def test_unbalanced_extra_answer_tag_is_format_error():
    text = "<think>t</think><answer>BAKERY</answer> <answer>"
    assert format_error(text)
    assert extract_answer(text) == "BAKERY"


def test_missing_tag_fallbacks():
    assert extract_answer("<think>t</think><answer> BAKERY <|im_end|>") == "BAKERY"
    assert extract_answer("<think>t</think>BAKERY</answer>") == "BAKERY"
    assert extract_answer("<think>t</think> bakery shop ") == "bakery shop"
    assert extract_answer("no tags at all") == "no tags at all"
    assert extract_answer("<think>only thinking</think>") is None
    assert extract_answer("<think>t</think><answer>  </answer>") is None
    for text in ["<think>t</think><answer>B", "<think>t</think>B</answer>", "<think>t</think>B", "B"]:
        assert format_error(text), text


def test_think_tag_mismatch():
    assert format_error("<think>a</think><think>b<answer>x</answer>")
    assert format_error("a</think><answer>x</answer>")
    assert not format_error("<answer>x</answer>")  # thinking is optional
    assert not format_error("<think>a</think><think>b</think><answer>x</answer>")


def test_nothing_to_judge_scores_zero_without_judging():
    judge = ScriptedJudge()
    r = run(score(req("<think>I could not decide.</think>"), judge, JudgeConfig()))
    assert (r.acc, r.format, r.score, r.answer) == (0.0, -1.0, pytest.approx(-0.2), None)
    assert judge.calls == []


# --- math rows ---------------------------------------------------------------------------------

MATH_Q = "The chart shows two bars of 3 and 6. What is the ratio of the first to the second?"


def test_math_row_boxed_decided_by_rule_without_judge():
    judge = ScriptedJudge(Verdict(None, False, error="judge down"))
    text = "<think>3/6 simplifies to one half.</think><answer>\\boxed{\\frac{1}{2}}</answer>"
    r = run(score(req(text, question=MATH_Q, ground_truth="0.5", data_source="thinklite_eureka"), judge, JudgeConfig()))
    assert r.score == pytest.approx(0.8) and r.judge_ok
    assert judge.calls == []


def test_math_row_not_verified_falls_back_to_judge():
    judge = ScriptedJudge(Verdict(True, True, raw="CORRECT"))
    text = "<think>3/6.</think><answer>one half</answer>"
    r = run(score(req(text, question=MATH_Q, ground_truth="0.5", data_source="thinklite_eureka"), judge, JudgeConfig()))
    assert len(judge.calls) == 1 and r.score == pytest.approx(0.8)


def test_math_row_wrong_boxed_is_judged_and_wrong():
    text = "<think>3/6.</think><answer>\\boxed{2}</answer>"
    r = run(score(req(text, question=MATH_Q, ground_truth="0.5", data_source="thinklite_eureka"),
                  RuleJudge(), JudgeConfig()))
    assert r.score == pytest.approx(0.0)


def test_math_checker_only_for_thinklite_and_when_enabled():
    text = "<think>t</think><answer>\\boxed{\\frac{1}{2}}</answer>"
    for source, cfg in [("vstar", JudgeConfig()), ("thinklite_eureka", JudgeConfig(math_checker=False))]:
        judge = ScriptedJudge(Verdict(False, True, raw="INCORRECT"))
        r = run(score(req(text, ground_truth="0.5", data_source=source), judge, cfg))
        assert len(judge.calls) == 1 and r.acc == 0.0


# --- failures and the failure policy -----------------------------------------------------------

def test_judge_failure_is_not_a_silent_zero():
    judge = ScriptedJudge(Verdict(None, False, error="judge at http://x/v1 failed 4 attempts"))
    r = run(score(req(TOOL_RIGHT, 1, 1), judge, JudgeConfig()))
    assert not r.judge_ok and "http://x/v1" in r.failure
    assert math.isnan(r.score) and math.isnan(r.acc)
    assert r.format == 0.0 and r.answer == "Bakery"


def test_failure_policies():
    bad = RewardResult(score=float("nan"), acc=float("nan"), format=0.0, tool=float("nan"),
                       judge_ok=False, failure="timed out", answer="Bakery")
    request = req(TOOL_RIGHT, 1, 1)
    with pytest.raises(JudgeFailure, match="timed out"):
        apply_failure_policy(bad, request, JudgeConfig(failure_policy="fail"))
    dropped = apply_failure_policy(bad, request, JudgeConfig(failure_policy="drop"))
    assert dropped.drop and not dropped.judge_ok and dropped.failure == "timed out" and math.isnan(dropped.score)
    ruled = apply_failure_policy(bad, request, JudgeConfig(failure_policy="rule"))
    assert ruled.score == pytest.approx(2.0) and not ruled.judge_ok and not ruled.drop and "rule" in ruled.failure
    good = RewardResult(score=0.8, acc=1.0, format=0.0, tool=0.0)
    assert apply_failure_policy(good, request, JudgeConfig(failure_policy="fail")) is good


# --- cache -------------------------------------------------------------------------------------

def test_identical_concurrent_requests_share_one_judgment():
    judge = ScriptedJudge(Verdict(True, True, raw="CORRECT"), delay=0.05)
    cache = VerdictCache(16)
    # GRPO-shaped: 8 samples of one prompt; answers differ only in case/spaces -> one key.
    texts = [f"<think>t{i}</think><answer>{a}</answer>" for i, a in enumerate(
        ["Bakery", "bakery", " BAKERY ", "Bakery.", "Bakery", "bakery", "BAKERY", "Bakery"])]

    async def go():
        return await asyncio.gather(*(score(req(t), judge, JudgeConfig(), cache) for t in texts))

    results = run(go())
    assert len(judge.calls) == 1
    assert sum(r.cached for r in results) == 7
    assert cache.stats()["cache_hits"] == 7 and cache.stats()["cache_misses"] == 1
    assert cache.stats()["cache_hit_rate"] == pytest.approx(7 / 8)
    assert all(r.score == pytest.approx(0.8) for r in results)


def test_cache_lru_eviction_and_failures_not_stored():
    judge = ScriptedJudge()
    cache = VerdictCache(2)

    async def go():
        for ans in ["a1", "a2", "a1", "a3", "a2"]:  # a2 was evicted by a3 (a1 was used more recently)
            await score(req(f"<answer>{ans}</answer>"), judge, JudgeConfig(), cache)

    run(go())
    assert [c[2] for c in judge.calls] == ["a1", "a2", "a3", "a2"]
    failing = ScriptedJudge(Verdict(None, False, error="down"))
    cache2 = VerdictCache(8)
    for _ in range(2):
        run(score(req(NO_TOOL_RIGHT), failing, JudgeConfig(), cache2))
    assert len(failing.calls) == 2  # a failure is asked again, never served from the cache
    s = stats(failing, cache2)
    assert s["calls"] == 2 and s["cache_entries"] == 0
