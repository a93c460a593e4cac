"""Issue 12: the rollout's boundaries refuse hostile values (each test reproduces an attack)."""

from __future__ import annotations

import pydantic
import pytest

from services.rollout.app import EpisodeBody
from services.rollout.engines import SamplingParams
from services.rollout.types import EpisodeRequest

MESSAGES = [{"role": "user", "content": "hi"}]
BAD_SAMPLING = [{"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": 1e-320},
                {"temperature": -1.0}, {"temperature": 1e9}, {"seed": 2**70}, {"seed": -1}]


@pytest.mark.parametrize("bad", BAD_SAMPLING, ids=str)
def test_bad_sampling_values_are_refused_at_every_boundary(bad):
    """Item 1: NaN / 1e-320 temperature or seed 2**70 used to reach the batched decode and fail
    every request of its batch; now the HTTP body (422), the episode request and the engine call
    refuse it."""
    with pytest.raises(pydantic.ValidationError):
        EpisodeBody(messages=MESSAGES, **bad)
    with pytest.raises(ValueError, match="temperature|seed"):
        EpisodeRequest(uid="u", group_id="g", messages=MESSAGES, **bad)
    with pytest.raises(ValueError, match="temperature|seed"):
        SamplingParams(8, **{"temperature": 1.0, **bad})


@pytest.mark.parametrize("good", [{"temperature": 0.0}, {"temperature": 0.01}, {"temperature": 10.0},
                                  {"seed": 0}, {"seed": 2**63 - 1}, {}], ids=str)
def test_sane_sampling_values_pass(good):
    EpisodeBody(messages=MESSAGES, **good)
    EpisodeRequest(uid="u", group_id="g", messages=MESSAGES, **good)
    SamplingParams(8, **{"temperature": 1.0, **good})


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": 5}],                                  # was a 500 TypeError in the template
    [{"role": "user", "content": [{"type": "video"}]}],
    [{"role": "user", "content": [{"type": "text"}]}],                 # a text part without text
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": [5]}],
    [{"role": "wizard", "content": "hi"}],
    [{"content": "hi"}],
    ["hi"],
], ids=str)
def test_malformed_messages_are_refused_by_the_http_body(messages):
    """Item 2: message shapes are checked at the boundary (FastAPI answers 422)."""
    with pytest.raises(pydantic.ValidationError):
        EpisodeBody(messages=messages)


def test_well_formed_messages_reach_the_request_as_plain_dicts():
    messages = [{"role": "system", "content": "s"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    assert EpisodeBody(messages=messages).model_dump()["messages"] == messages
