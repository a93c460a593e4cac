"""Hostile input to the judge's pure core (issue 12): extraction and rule matching run in linear
time, and a big request does not hold the event loop.

The time bounds are generous (2 s for inputs the quadratic regexes took 15-40 s on): they check
the complexity, not the speed of the machine."""

from __future__ import annotations

import asyncio
import time

import pytest

from deepeyes.config import JudgeConfig
from services.judge.backends import RuleJudge, normalize_text, parse_options, rule_match
from services.judge.reward import ScoreRequest, extract_answer, format_error
from services.judge.scoring import score

HOSTILE = 256 * 1024  # bytes, the size the attack used


def _elapsed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


@pytest.mark.parametrize("text", ["<answer>" * (HOSTILE // 8), "</think><answer>" * (HOSTILE // 16),
                                  "<answer>x" + " " * HOSTILE])
def test_answer_extraction_is_linear_on_hostile_text(text):
    answer, seconds = _elapsed(extract_answer, text)
    assert seconds < 2.0
    assert format_error(text)


@pytest.mark.parametrize("question", ["(A) x" + " " * HOSTILE + "y (B) z",
                                      "(A)" + " " * HOSTILE, "\n" * HOSTILE + "A",
                                      "A. x" + " " * HOSTILE + "y\nB. z",
                                      "\\boxed{" * (HOSTILE // 7)])
def test_option_parsing_and_rule_matching_are_linear_on_hostile_questions(question):
    _, seconds = _elapsed(rule_match, question, question, "(A)")
    assert seconds < 2.0


def test_linear_parsers_keep_their_meaning():
    # the same answers as the regular expressions gave (reference values worked out by hand)
    assert extract_answer("<answer>x<answer>y</answer>") == "x<answer>y"
    assert extract_answer("<answer>a</answer> <answer>b</answer>") == "b"
    assert extract_answer("<answer>a</answer><answer>b") == "a"
    assert parse_options("(A) red  (B)  dark\tgreen\n(C) blue ") == {"A": "red", "B": "dark green", "C": "blue"}
    assert parse_options("(A)(B) red") == {}  # "(B) red" is the text of A: one option only
    assert parse_options("Pick:\n A. red\n\n B)  blue  \n") == {"A": "red", "B": "blue"}
    assert normalize_text("The answer is \\boxed{ 12 }.") == "answer is 12"
    assert normalize_text("\\boxed{a} and \\boxed{b}") == "a} and \\boxed{b"


def test_linear_parsers_agree_with_the_regular_expressions_on_random_text():
    # the reference: the patterns the parsers replaced, on short random texts of their tokens
    import random
    import re

    pair = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
    inline = re.compile(r"\(([A-Za-z])\)\s*(.+?)(?=\s*\([A-Za-z]\)|\n|$)", re.DOTALL)
    line = re.compile(r"^\s*([A-Z])[.:)]\s+(.+?)\s*$", re.MULTILINE)
    rng = random.Random(0)
    tags = ["<answer>", "</answer>", "</think>", "x", " ", "yes"]
    parts = ["(A)", "(b)", "A.", "B)", " ", "  ", "\n", " \n ", "\t", "red", "x", "C:"]
    for _ in range(3000):
        text = "".join(rng.choices(tags, k=rng.randint(0, 8)))
        tail = text[text.rfind("</think>") + len("</think>"):] if "</think>" in text else text
        pairs = pair.findall(tail)
        if pairs:
            assert extract_answer(text) == (pairs[-1].strip() or None)
        question = "".join(rng.choices(parts, k=rng.randint(0, 10)))
        expected = {}
        for pattern in (inline, line):
            found = {k.upper(): " ".join(v.split()) for k, v in pattern.findall(question)}
            if len(found) >= 2:
                expected = found
                break
        assert parse_options(question) == expected, question


def test_a_hostile_request_does_not_block_the_event_loop():
    cfg = JudgeConfig()
    hostile = ScoreRequest("<answer>" * (HOSTILE // 8) + "(A)" + " " * HOSTILE,
                           "(A) x" + " " * HOSTILE + "y (B) z", "A")

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        before = ticks
        await score(hostile, RuleJudge(), cfg)
        t.cancel()
        return ticks - before

    assert asyncio.run(main()) >= 1  # the loop kept running while the request was scored
