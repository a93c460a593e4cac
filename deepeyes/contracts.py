"""What crosses a service boundary: the types and rules two rooms must agree on.

The rollout service sends a `ScoreRequest` to the judge and gets a `RewardResult` back; it calls a
tool by name with the arguments the model wrote, an image passed by reference (`image_arg`), and
gets a `ToolResult`; the tools' schemas (what the system prompt offers the model) are data here,
so the rollout renders prompts without importing the tool service. Services import this module,
never each other (tests/unit/test_structure.py checks it). Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from PIL import Image

from deepeyes.chat import ZOOM_IN_SCHEMA


@dataclass
class ScoreRequest:
    """One finished episode to score. `response_text` is the decoded response (all turns)."""

    response_text: str
    question: str
    ground_truth: str
    data_source: str = ""
    tool_calls: int = 0
    crops: int = 0


@dataclass
class RewardResult:
    """The reward and its parts, as the judge service returns it and the Trajectory carries it.

    judge_ok=False: no verdict could be had (see `failure`); it stays False after the failure
    policy so the failure is counted in judge/failures. drop=True: judge.failure_policy=drop
    applied, leave the episode out of the update; score/acc/tool are then NaN so that a caller
    that ignores `drop` fails loudly instead of training on a silent zero.
    """

    score: float
    acc: float
    format: float
    tool: float
    judge_ok: bool = True
    failure: str = ""
    answer: str | None = None
    cached: bool = False
    judge_latency_s: float = 0.0
    drop: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ToolResult:
    """What a tool call gives back to the episode.

    Attributes:
        ok: True when the tool produced its image; False for any error (the text says why).
        text: one line for the `<tool_response>` turn: the success note or the error text.
        image: the produced image at native size (None on error).
    """

    ok: bool
    text: str
    image: Image.Image | None = None


ROTATE_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "image_rotate_tool",
        "description": ("Rotate the image counter-clockwise by the given angle in degrees, for "
                        "example to read text that is sideways or upside down."),
        "parameters": {
            "type": "object",
            "properties": {
                "angle": {
                    "type": "number",
                    "description": "Counter-clockwise rotation in degrees, e.g. 90, 180 or 270.",
                },
            },
            "required": ["angle"],
        },
    },
}

TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    ZOOM_IN_SCHEMA["function"]["name"]: ZOOM_IN_SCHEMA,
    ROTATE_SCHEMA["function"]["name"]: ROTATE_SCHEMA,
}


def tool_schemas(names: list[str]) -> list[dict[str, Any]]:
    """The OpenAI function schemas of `names`, in that order (for the system turn's # Tools block);
    a KeyError names the known tools."""
    unknown = [n for n in names if n not in TOOL_SCHEMAS]
    if unknown:
        raise KeyError(f"unknown tool(s) {unknown} (known: {', '.join(sorted(TOOL_SCHEMAS))})")
    return [TOOL_SCHEMAS[n] for n in names]


def image_arg(ref: Any) -> list[Any]:
    """How in-cluster callers pass an image by reference (a ray.ObjectRef) to the tool service's
    `call`: wrapped in a list, so Ray hands the reference over unresolved."""
    return [ref]
