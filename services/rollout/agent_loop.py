"""The multi-turn agent loop (docs/design.md, "Agent loop limits"): generate, call the zoom tool, observe, repeat.

Pure: no Ray. The engine, the tool and the judge come in as callables, so the same loop runs in a
Serve replica, in a unit test with scripted fakes, or in a notebook.

Token-in/token-out. The prompt is rendered once with deepeyes.chat.CHAT_TEMPLATE and tokenized with
its images expanded; after that, every turn only appends ids: the sampled assistant ids (loss mask
1, their sampling log-probs) and the observation segment (loss mask 0, log-prob 0.0). The segment
is the template's own text for the `tool` messages, cut from a rendering with and without them, so
it starts right after the sampled `<|im_end|>` ("\\n<|im_start|>user\\n<tool_response>\\n...") and
ends with the generation prompt "<|im_start|>assistant\\n".

Decisions the design leaves open, made here:
- num_turns = 1 (the prompt) + assistant turns + observation turns, as verl counts them; an
  episode of k successful calls then an answer has 2k + 2 turns (docs/design.md, "Metric names").
- A turn that stops at its token cap without `<|im_end|>` ends the episode: its ids stay (loss
  mask 1, they were sampled) but it is not parsed for calls (a cut-off call has no valid JSON and
  appending an observation after a half turn would break the chat layout). finish_reason is
  "budget" when the shared budget was the cap, else "length".
- Every `<tool_call>` block the model wrote is a ToolCallRecord; the first max_parallel_calls are
  executed (malformed JSON or an unknown tool get an error observation, not a crash), the rest are
  recorded with executed=False. Calls of the last allowed turn are not executed (turn_cap).
- The tool always gets the first prompt image in the model frame, never a crop; crops returned by
  the tool are resized to the model frame before they join the trajectory, so the trainer's image
  processor sees exactly what the engine saw. Opt-in (EpisodeRequest.crop_source, evaluation):
  the tool gets the original instead, with the frame's size, and cuts the crop there at the box
  mapped from the frame (the crop is then brought to the model frame as above).
- EpisodeRequest.use_tools=False (the tool ablation): no tools block, and a turn that writes a
  `<tool_call>` ends the episode with its calls recorded as not executed ("tools disabled").
- ScoreRequest.tool_calls counts every executed call block (the verl "call" notion), crops counts
  the crop images appended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from PIL import Image

from deepeyes.chat import CHAT_TEMPLATE
from deepeyes.config import RolloutConfig, ToolsConfig
from deepeyes.contracts import RewardResult, ScoreRequest, ToolResult
from deepeyes.toolspec import ToolSpec, prompt_schemas, specs_for
from deepeyes.policy import encode_text_with_images, merged_patches
from services.rollout.calls import observation_message, parse_calls
from services.rollout.engines import GenerateResult, SamplingParams
from services.rollout.trajectory import ToolCallRecord, Trajectory
from services.rollout.types import EpisodeRequest, PolicyIO


GenerateFn = Callable[[list[int], list[Image.Image], SamplingParams], Awaitable[GenerateResult]]
ToolFn = Callable[[str, Image.Image | None, dict[str, Any]], Awaitable[ToolResult]]
ScoreFn = Callable[[ScoreRequest], Awaitable[RewardResult]]
ReleaseFn = Callable[[str, str], Awaitable[None]]  # (tool name, instance id): free the trajectory's instance
RELEASE_TIMEOUT_S = 10.0  # a release that hangs is abandoned (the tool's TTL sweep frees it)
IMAGE_TOOLS_DEPLOYMENT = "ToolService"  # its tools keep the (name, image, arguments) call shape

log = logging.getLogger(__name__)

class InvariantError(RuntimeError):
    """The token ids and the images disagree: a bug in rendering, never a user mistake."""


# ---------------------------------------------------------------------------------------------
# parsing and rendering


def render_prompt(policy_io: PolicyIO, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """The prompt text: the project template with the tools block and the generation prompt."""
    return policy_io.tokenizer.apply_chat_template(
        messages, tools=tools or None, chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
        tokenize=False)


def observation_text(policy_io: PolicyIO, tool_messages: list[dict[str, Any]]) -> str:
    """The text that follows a sampled <|im_end|> when these tool messages come back.

    Rendered by the template itself: a minimal conversation ending in an assistant turn, with and
    without the tool messages; the difference (plus the "\\n" the template writes after the
    assistant's <|im_end|>) is the segment. The template renders a tool turn from the roles around
    it only, so the placeholder context does not change it.
    """
    base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    render = policy_io.tokenizer.apply_chat_template
    before = render(base, chat_template=CHAT_TEMPLATE, add_generation_prompt=False, tokenize=False)
    after = render(base + tool_messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
                   tokenize=False)
    if not (after.startswith(before) and before.endswith("<|im_end|>\n")):
        raise InvariantError("the chat template does not render tool turns as a suffix of the "
                             "conversation; the observation segment cannot be cut from it")
    return after[len(before) - 1:]


def check_image_tokens(ids: list[int], grids: list[list[int]], pad_id: int) -> None:
    """Number of <|image_pad|> ids == sum of merged patches over the images (docs/design.md, "Chat format")."""
    n_pad = sum(1 for t in ids if t == pad_id)
    expected = sum(merged_patches(g) for g in grids)
    if n_pad != expected:
        raise InvariantError(f"{n_pad} <|image_pad|> tokens but the {len(grids)} images need "
                             f"{expected} (grids {grids})")


# ---------------------------------------------------------------------------------------------
# the loop


async def run_episode(request: EpisodeRequest, *, policy_io: PolicyIO, generate: GenerateFn,
                      call_tool: ToolFn, score: ScoreFn | None, cfg: RolloutConfig, tools_cfg: ToolsConfig,
                      tool_schemas: list[dict[str, Any]] | None = None,
                      policy_version: int = 0, specs: list[ToolSpec] | None = None,
                      release_tool: ReleaseFn | None = None) -> Trajectory:
    """Run one episode to its end and return its Trajectory (see the module docstring).

    Args:
        request: the prompt, images (any resolution: brought to the model frame here, a no-op
            for images already in it, as the trainer sends them), reference answer and sampling
            overrides.
        policy_io: tokenizer, image processor and ids of the policy the engine serves.
        generate: engine call (prompt ids, images in the model frame, SamplingParams).
        call_tool: async (name, image in the model frame, arguments) -> ToolResult-like. Tools
            hosted outside ToolService (the plugins: python, search) also get `instance_id=`
            (the trajectory's own, fresh per episode) and `row_id=`.
        score: async ScoreRequest -> RewardResult (failure policy applied), or None for no reward
            (the trajectory's reward stays None).
        cfg: RolloutConfig (turn cap, parallel calls, budgets, sampling defaults).
        tools_cfg: ToolsConfig (enabled tools, per-call timeout).
        tool_schemas: the tools block; None = the enabled tool_call tools' registry schemas.
        policy_version: recorded in the trajectory (the engine's version when the episode started).
        specs: the enabled tools' registry entries; None = deepeyes.toolspec.specs_for(tools_cfg).
        release_tool: async (name, instance_id) called once per stateful tool the episode used,
            however the episode ends (None: nothing to release).

    Raises:
        ValueError: the prompt is longer than cfg.max_prompt_length, or images and image slots differ.
        InvariantError: pad tokens and images disagree (a bug).
    """
    t_start = time.perf_counter()
    specs = specs_for(tools_cfg) if specs is None else specs
    if request.extra.get("tools") is not None:  # the row names its tools: those alone are offered
        specs = [s for s in specs if s.name in request.extra["tools"]]
    if not request.use_tools:
        tool_schemas = []
    elif tool_schemas is None:
        tool_schemas = prompt_schemas(specs)
    ep = _start(request, policy_io, cfg, tool_schemas)
    ep.specs = {s.name: s for s in specs}
    ep.instance_id = f"{request.uid}-{uuid.uuid4().hex[:12]}"  # never shared: a fresh id per trajectory
    if tools_cfg.stop_at_call and request.use_tools:
        ep.stop_strings = sorted({s.call_end for s in specs})
    try:
        for turn in range(cfg.max_assistant_turns):
            text = await _generate_turn(ep, turn, request, policy_io, generate, cfg)
            if text is None:  # the budget is spent, or the turn was cut at its token cap
                break
            calls = _calls_to_run(ep, turn, text, request, cfg)
            if calls is None:  # an answer, or calls that will not run (tools off, the last turn)
                break
            if not await _tools_and_observe(ep, turn, calls, policy_io, call_tool, tools_cfg, request):
                break
        else:  # the loop ran out of turns right after an observation: cannot happen (last turn breaks)
            ep.finish = "turn_cap"
    finally:
        await _release(ep, release_tool)
    traj = _trajectory(ep, request, policy_io, policy_version)
    # REWARD
    if score is not None:
        t0 = time.perf_counter()
        traj.reward = await score(traj.score_request())
        ep.timings["judge_s"] = time.perf_counter() - t0
    ep.timings["total_s"] = time.perf_counter() - t_start
    traj.timings = ep.timings
    return traj


@dataclass
class _Episode:
    """An episode in progress: the prompt, the response so far and what each turn added."""

    prompt_ids: list[int]
    images: list[Image.Image]
    grids: list[Any]
    tool_image: Any  # what the tools cut from: the frame, or the encoded original (crop_source)
    frame_size: tuple[int, int] | None  # the model frame's size when tool_image is not the frame
    temperature: float
    budget: int
    response: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    records: list[ToolCallRecord] = field(default_factory=list)
    assistant_texts: list[str] = field(default_factory=list)
    assistant_turns: int = 0
    observation_turns: int = 0
    finish: str = "answer"
    timings: dict[str, float] = field(default_factory=lambda: {"generate_s": 0.0, "tool_s": 0.0, "judge_s": 0.0})
    specs: dict[str, ToolSpec] = field(default_factory=dict)  # the enabled tools by name
    instance_id: str = ""  # the trajectory's instance of every stateful tool
    stop_strings: list[str] = field(default_factory=list)  # tools.stop_at_call: where a call closes
    open_turn: bool = False  # the last turn stopped at a call's end, before <|im_end|>
    used: dict[str, int] = field(default_factory=dict)  # executed calls per tool name


def _start(request: EpisodeRequest, policy_io: PolicyIO, cfg: RolloutConfig,
           tool_schemas: list[dict[str, Any]]) -> _Episode:
    """PROMPT: rendered once, images in the model frame, pads expanded per image."""
    images = [policy_io.to_model_frame(im) for im in request.images]
    grids = policy_io.grids(images)
    prompt_ids = encode_text_with_images(policy_io, render_prompt(policy_io, request.messages, tool_schemas), grids)
    if len(prompt_ids) > cfg.max_prompt_length:
        raise ValueError(f"episode {request.uid}: prompt has {len(prompt_ids)} tokens, more than "
                         f"rollout.max_prompt_length={cfg.max_prompt_length}; shorten the prompt, lower "
                         f"model.max_pixels or raise rollout.max_prompt_length")
    tool_image: Any = images[0] if images else None
    frame_size: tuple[int, int] | None = None
    if request.crop_source is not None and images:  # crop the original at the mapped box
        tool_image, frame_size = request.crop_source, images[0].size
    temperature = 0.0 if request.greedy else (cfg.temperature if request.temperature is None else request.temperature)
    return _Episode(prompt_ids=prompt_ids, images=images, grids=grids, tool_image=tool_image, frame_size=frame_size,
                    temperature=temperature, budget=cfg.max_response_length)


async def _generate_turn(ep: _Episode, turn: int, request: EpisodeRequest, policy_io: PolicyIO,
                         generate: GenerateFn, cfg: RolloutConfig) -> str | None:
    """GENERATE one assistant turn; its text without the end token, or None when the episode ends
    here (no budget left, or the turn was cut at its token cap: see the module docstring)."""
    remaining = ep.budget - len(ep.response)
    if remaining <= 0:
        ep.finish = "budget"
        return None
    max_new = min(cfg.max_new_tokens_per_turn, remaining)
    sp = SamplingParams(max_new_tokens=max_new, temperature=ep.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k, stop_token_ids=[policy_io.eos_id],
                        banned_token_ids=policy_io.banned_ids, stop_strings=ep.stop_strings,
                        seed=None if request.seed is None else request.seed + turn)
    check_image_tokens(ep.prompt_ids + ep.response, ep.grids, policy_io.image_pad_id)
    t0 = time.perf_counter()
    out = await generate(ep.prompt_ids + ep.response, ep.images, sp)
    ep.timings["generate_s"] += time.perf_counter() - t0
    ids = list(out.token_ids)[:max_new]
    ep.response += ids
    ep.mask += [1] * len(ids)
    ep.logprobs += [float(x) for x in out.logprobs[:len(ids)]]
    ep.assistant_turns += 1
    ended = bool(ids) and ids[-1] == policy_io.eos_id
    text = policy_io.tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=False)
    ep.assistant_texts.append(policy_io.tokenizer.decode(ids, skip_special_tokens=True))
    ep.open_turn = (not ended and out.finish_reason == "stop" and bool(ep.stop_strings)
                    and any(stop in text for stop in ep.stop_strings))
    if not (ended or ep.open_turn):
        ep.finish = "budget" if max_new == remaining else "length"
        return None
    return text


def _calls_to_run(ep: _Episode, turn: int, text: str, request: EpisodeRequest,
                  cfg: RolloutConfig) -> tuple[list[Any], list[ToolCallRecord]] | None:
    """The turn's calls to execute and the records of those that will not; None when the episode
    ends with this turn (an answer, tools off, or calls written in the last allowed turn)."""
    calls = parse_calls(text, list(ep.specs.values()))
    if calls and not request.use_tools:
        ep.records += [ToolCallRecord(turn=turn, name=name, arguments=args, ok=False, text="tools disabled",
                                      executed=False, appended=False) for name, args, _ in calls]
        calls = []
    if not calls:
        ep.finish = "answer"
        return None
    last_turn = turn + 1 >= cfg.max_assistant_turns
    n_exec = 0 if last_turn else min(len(calls), cfg.max_parallel_calls)
    why = "turn cap reached" if last_turn else f"not executed: at most {cfg.max_parallel_calls} call(s) per turn"
    skipped = [ToolCallRecord(turn=turn, name=name, arguments=args, ok=False, text=why,
                              executed=False, appended=False) for name, args, _ in calls[n_exec:]]
    if last_turn:
        ep.records += skipped
        ep.finish = "turn_cap"
        return None
    return calls[:n_exec], skipped


async def _tools_and_observe(ep: _Episode, turn: int, planned: tuple[list[Any], list[ToolCallRecord]],
                             policy_io: PolicyIO, call_tool: ToolFn, tools_cfg: ToolsConfig,
                             request: EpisodeRequest) -> bool:
    """TOOLS, then OBSERVE: the segment is appended only if it fits the shared budget (with its
    images). False when it did not fit (the episode ends on the budget)."""
    calls, skipped = planned
    t0 = time.perf_counter()
    results = await asyncio.gather(*(_call_one(call_tool, ep, name, args, _over_limit(ep, name) or error,
                                               tools_cfg, request)
                                     for name, args, error in calls))
    ep.timings["tool_s"] += time.perf_counter() - t0
    turn_records, tool_messages, new_images = [], [], []
    for (name, args, _), (res, latency) in zip(calls, results):
        images = [policy_io.to_model_frame(im) for im in res.all_images()[:tools_cfg.max_images_per_call]]
        turn_records.append(ToolCallRecord(turn=turn, name=name, arguments=args, ok=bool(res.ok), text=str(res.text),
                                           status=res.outcome, latency_s=latency, images=len(images)))
        spec = ep.specs.get(name)
        tool_messages.append(observation_message(spec.observation if spec else "tool_response", str(res.text), images))
        new_images += images
    new_grids = policy_io.grids(new_images)
    seg = encode_text_with_images(policy_io, observation_text(policy_io, tool_messages), new_grids)
    if ep.open_turn:  # the turn stopped where the call closed: its end token is the loop's, not sampled
        seg = [policy_io.eos_id] + seg
    ep.records += turn_records + skipped
    if len(ep.response) + len(seg) > ep.budget:
        for r in turn_records:
            r.appended = False
        ep.finish = "budget"
        return False
    ep.response += seg
    ep.mask += [0] * len(seg)
    ep.logprobs += [0.0] * len(seg)
    ep.images += new_images
    ep.grids += new_grids
    ep.observation_turns += 1
    return True


def _over_limit(ep: _Episode, name: str) -> str | None:
    """Count the call; an error text when the tool's per-episode cap (limits.max_per_episode) is spent."""
    spec = ep.specs.get(name)
    ep.used[name] = ep.used.get(name, 0) + 1
    if spec is not None and spec.max_per_episode and ep.used[name] > spec.max_per_episode:
        return f"Error: {name} can be called at most {spec.max_per_episode} time(s) per episode."
    return None


async def _release(ep: _Episode, release_tool: ReleaseFn | None) -> None:
    """Release the trajectory's instance of every stateful tool it called; a failure is logged (the
    tool's TTL sweep frees what a release could not)."""
    names = [n for n in ep.used if n in ep.specs and ep.specs[n].stateful]
    if release_tool is None or not names:
        return
    for name in names:
        try:
            await asyncio.wait_for(release_tool(name, ep.instance_id), RELEASE_TIMEOUT_S)
        except Exception as e:  # the episode's result stands; the instance ages out
            log.warning("releasing %s instance %s failed: %s: %s", name, ep.instance_id, type(e).__name__, e)


def _trajectory(ep: _Episode, request: EpisodeRequest, policy_io: PolicyIO, policy_version: int) -> Trajectory:
    """The finished episode, its invariants checked."""
    check_image_tokens(ep.prompt_ids + ep.response, ep.grids, policy_io.image_pad_id)
    if not (len(ep.response) == len(ep.mask) == len(ep.logprobs)) or len(ep.response) > ep.budget:
        raise InvariantError(f"response {len(ep.response)} / mask {len(ep.mask)} / logprobs {len(ep.logprobs)} "
                             f"disagree or exceed the budget {ep.budget}")
    return Trajectory(
        uid=request.uid, group_id=request.group_id, prompt_ids=ep.prompt_ids, response_ids=ep.response,
        loss_mask=ep.mask, logprobs=ep.logprobs, images=ep.images, image_grid_thw=ep.grids,
        response_text="\n".join(ep.assistant_texts), tool_calls=ep.records,
        num_turns=1 + ep.assistant_turns + ep.observation_turns, policy_version=policy_version,
        finish_reason=ep.finish, data_source=request.data_source, ground_truth=request.ground_truth,
        question=request.question, extra=dict(request.extra))


async def _call_one(call_tool: ToolFn, ep: _Episode, name: str, args: dict[str, Any] | None,
                    error: str | None, tools_cfg: ToolsConfig, request: EpisodeRequest) -> tuple[ToolResult, float]:
    """One tool call -> (result, seconds); parse errors and timeouts become error results.

    The call shape: `(name, image, arguments)`, plus `frame_size=` when the image is the original
    (EpisodeRequest.crop_source), plus `instance_id=` and `row_id=` for tools hosted outside
    ToolService (the plugins).

    The one timeout of a tool call (tools.timeout_s): it bounds the whole exchange, queueing in
    the tool service included, whatever `call_tool` is (a Serve handle, a local function).
    """
    if error is not None:
        return ToolResult(False, error, status="error"), 0.0
    options: dict[str, Any] = {}
    if ep.frame_size is not None:
        options["frame_size"] = ep.frame_size
    spec = ep.specs.get(name)
    if spec is not None and spec.deployment != IMAGE_TOOLS_DEPLOYMENT:
        options.update(instance_id=ep.instance_id, row_id=str(request.extra.get("row_id", request.group_id)),
                       fresh=ep.used.get(name, 0) <= 1)
    t0 = time.perf_counter()
    try:
        res = await asyncio.wait_for(call_tool(name, ep.tool_image, args or {}, **options), timeout=tools_cfg.timeout_s)
    except asyncio.TimeoutError:
        return (ToolResult(False, f"Error: the tool {name} did not answer within {tools_cfg.timeout_s} s.",
                           status="timeout"), time.perf_counter() - t0)
    except Exception as e:  # the tool service failed: the episode goes on with an error text
        return (ToolResult(False, f"Error: the tool {name} failed ({type(e).__name__}: {e}).", status="lost"),
                time.perf_counter() - t0)
    latency = time.perf_counter() - t0
    if not isinstance(res, ToolResult):  # a duck-typed result (tests, local functions)
        res = ToolResult(bool(res.ok), str(res.text), getattr(res, "image", None))
    return (res if res.ok else dataclasses.replace(res, image=None, images=[])), latency
