"""What crosses a service boundary: the types and rules two rooms must agree on.

The rollout service sends a `ScoreRequest` to the judge and gets a `RewardResult` back; it calls a
tool by name with the arguments the model wrote, an image passed by reference (`image_arg`), and
gets a `ToolResult`; the tools' schemas (what the system prompt offers the model) are data in the
registry YAML (deepeyes/toolspec.py), so the rollout renders prompts without importing the tool
service. Services import this module,
never each other (tests/unit/test_structure.py checks it). Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from PIL import Image



@dataclass
class ScoreRequest:
    """One finished episode to score. `response_text` is the decoded response (all turns)."""

    response_text: str
    question: str
    ground_truth: str
    data_source: str = ""
    tool_calls: int = 0
    crops: int = 0
    tools_used: list[str] = field(default_factory=list)  # names of the executed calls, in order


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
        ok: True when the tool did what was asked; False for any error (the text says why).
        text: the observation text: the success note, the code's output, the search results, or
            the error text.
        image: the produced image at native size (the zoom's crop; None on error).
        images: further images (a code call's figures, image search results), in order, after
            `image`; the agent loop caps how many join the trajectory.
        status: "ok", "error", or what stopped the call: "timeout", "memory", "lost" (the
            instance's state is gone, e.g. its replica died), "killed"; "" = ok/error from `ok`.
        metrics: numbers the tool wants on the dashboard (e.g. exec_s, restarted).
    """

    ok: bool
    text: str
    image: Image.Image | None = None
    images: list[Image.Image] = field(default_factory=list)
    status: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def all_images(self) -> list[Image.Image]:
        """`image` (when set) then `images`."""
        return ([self.image] if self.image is not None else []) + list(self.images)

    @property
    def outcome(self) -> str:
        return self.status or ("ok" if self.ok else "error")


def image_arg(ref: Any) -> list[Any]:
    """How in-cluster callers pass an image by reference (a ray.ObjectRef) to the tool service's
    `call`: wrapped in a list, so Ray hands the reference over unresolved."""
    return [ref]
