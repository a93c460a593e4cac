"""The trajectory record: what one episode of the agent loop hands to the trainer.

This is the contract between the rollout service and the GRPO driver (docs/design.md, "Data flow of one GRPO step").
Token lists are the exact ids the engine consumed and produced: never re-rendered from text.
`image_grid_thw` is the engine's own grid of each image, so the trainer checks the pad invariant
(docs/design.md, "Reward") against it. `reward` is the judge service's RewardResult with
judge.failure_policy already applied; None when the rollout did not score (rollout.reward=never,
or no judge app under auto).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from deepeyes.contracts import RewardResult, ScoreRequest


@dataclass
class ToolCallRecord:
    """One parsed <tool_call> and what came of it."""

    turn: int                      # assistant turn (0-based) that made the call
    name: str                      # tool name as the model wrote it ("" when unparseable)
    arguments: dict[str, Any] | None
    ok: bool                       # True when the tool returned a result (a crop for the zoom tool)
    text: str                      # the observation text returned to the model (or the error text)
    executed: bool = True          # False for calls ignored beyond max_parallel_calls
    appended: bool = True          # False when the observation did not fit the token budget
    status: str = ""               # ok | error | timeout | memory | lost | killed ("" = not run)
    latency_s: float = 0.0         # the call's wall time as the episode saw it
    images: int = -1               # images of the result that joined (-1: not counted; one if ok and appended)


@dataclass
class Trajectory:
    """One episode: prompt + multi-turn response, masks, images, reward parts, timings."""

    uid: str                       # unique episode id
    group_id: str                  # prompt id: GRPO groups episodes by this
    prompt_ids: list[int]
    response_ids: list[int]        # model and observation tokens after the prompt
    loss_mask: list[int]           # 1 = sampled by the policy, 0 = observation; len == response_ids
    logprobs: list[float]          # sampling log-prob per response token (0.0 where loss_mask == 0)
    images: list[Image.Image]      # in order of their pad runs: the original, then each crop
    image_grid_thw: list[list[int]]  # (t, h, w) of each image as the engine saw it: what the pad count must match
    response_text: str             # decoded response (for logging and the judge)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    num_turns: int = 0             # 1 (prompt) + assistant turns + observation turns: 2 x calls + 2 ("Metric names")
    policy_version: int = 0
    finish_reason: str = ""        # answer | turn_cap | budget | length | error
    reward: RewardResult | None = None  # failure policy applied (drop=True: leave out); None = not scored
    timings: dict[str, float] = field(default_factory=dict)  # generate_s, tool_s, judge_s, total_s
    data_source: str = ""
    ground_truth: str = ""
    question: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. target_bbox from the data row

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def crops_returned(self) -> int:
        return sum(1 for c in self.tool_calls if c.ok and c.appended)

    def score_request(self) -> ScoreRequest:
        """What the judge needs of this episode: the response, executed calls, crops that came back."""
        return ScoreRequest(response_text=self.response_text, question=self.question,
                            ground_truth=self.ground_truth, data_source=self.data_source,
                            tool_calls=sum(1 for c in self.tool_calls if c.executed), crops=self.crops_returned,
                            tools_used=[c.name for c in self.tool_calls if c.executed])
