"""The agent loop with scripted engines and a fake crop tool (no Ray, no sampling).

Golden values come from the chat template rendered on the FULL message list and tokenized on its
own, never from the loop's output.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from PIL import Image

from deepeyes.chat import CHAT_TEMPLATE, SYSTEM_PROMPT
from deepeyes.config import RolloutConfig, ToolsConfig
from deepeyes.policy import encode_text_with_images, load_policy, merged_patches
from services.rollout.agent_loop import run_episode
from services.rollout.calls import parse_tool_calls
from services.rollout.engines import GenerateResult
from services.rollout.types import EpisodeRequest, PolicyIO

SCHEMAS = [{"type": "function", "function": {"name": "image_zoom_in_tool", "description": "zoom",
                                              "parameters": {"type": "object", "properties": {}}}}]
CALL = '<think>the sign is small</think>\n<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 90, 80]}}\n</tool_call>'
ANSWER = "<think>it is red</think><answer>red</answer>"


@pytest.fixture(scope="module")
def io(tiny_policy_dir):
    return PolicyIO.from_policy(load_policy(tiny_policy_dir))


@dataclass
class FakeToolResult:  # the shape of services.tools.registry.ToolResult
    ok: bool
    text: str
    image: Image.Image | None = None


class FakeCropTool:
    """Stands in for the tool service: crops the box it is given, records what it saw."""

    def __init__(self):
        self.seen: list[tuple[str, tuple[int, int], dict]] = []

    async def __call__(self, name, image, arguments):
        self.seen.append((name, image.size, arguments))
        x1, y1, x2, y2 = arguments["bbox_2d"]
        return FakeToolResult(True, f"Zoomed in on {arguments['bbox_2d']}.", image.crop((x1, y1, x2, y2)))


class ScriptedEngine:
    """Replays fixed assistant texts as token ids (with <|im_end|> unless told otherwise)."""

    def __init__(self, io, texts, end=True):
        self.io, self.texts, self.end, self.calls = io, list(texts), end, []

    async def __call__(self, prompt_ids, images, sampling):
        self.calls.append((list(prompt_ids), list(images), sampling))
        text = self.texts.pop(0)
        ids = self.io.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.end:
            ids = ids + [self.io.eos_id]
        ids = ids[:sampling.max_new_tokens]
        return GenerateResult(ids, [-0.5] * len(ids), "stop" if ids and ids[-1] == self.io.eos_id else "length")


def request(image=None):
    image = image or Image.new("RGB", (300, 200), "blue")
    return EpisodeRequest(uid="e0", group_id="g0", messages=[
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the sign?"}]}],
        images=[image], ground_truth="red", question="What color is the sign?", data_source="vstar")


def run(io, texts, *, cfg=None, tool=None, end=True, score=None, tools_cfg=None):
    cfg = cfg or RolloutConfig(max_response_length=4096, max_new_tokens_per_turn=512, max_prompt_length=8192)
    engine = ScriptedEngine(io, texts, end)
    tool = tool or FakeCropTool()
    traj = asyncio.run(run_episode(request(), policy_io=io, generate=engine, call_tool=tool, score=score,
                                   cfg=cfg, tools_cfg=tools_cfg or ToolsConfig(), tool_schemas=SCHEMAS))
    return traj, engine, tool


def test_golden_episode_matches_the_full_rendering(io):
    traj, engine, tool = run(io, [CALL, ANSWER])
    # the tool saw the ORIGINAL image in the model frame: 300x200 = 60000 px > max_pixels 50176, so
    # scale by sqrt(60000/50176) and floor to multiples of 28: 252x168 (by hand)
    assert tool.seen == [("image_zoom_in_tool", (252, 168), {"bbox_2d": [10, 20, 90, 80]})]
    crop = Image.new("RGB", (252, 168), "blue").crop((10, 20, 90, 80))
    # the reference: the whole conversation rendered by the template and tokenized independently
    full = [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the sign?"}]},
            {"role": "assistant", "content": CALL},
            {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Zoomed in on [10, 20, 90, 80]."}]},
            {"role": "assistant", "content": ANSWER}]
    text = io.tokenizer.apply_chat_template(full, tools=SCHEMAS, chat_template=CHAT_TEMPLATE, tokenize=False)
    grids = [[1, 12, 18], [1, 4, 6]]  # 168/14 x 252/14; the 80x60 crop -> 84x56 -> 6x4 patches
    ref = encode_text_with_images(io, text, grids)
    newline = io.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert traj.input_ids + newline == ref
    assert traj.image_grid_thw == grids
    assert [im.size for im in traj.images] == [(252, 168), (84, 56)]
    assert traj.images[1].resize((80, 60)).tobytes() != b"" and crop.size == (80, 60)
    # masks: 1 exactly on the two sampled turns (each ending in <|im_end|>), 0 on the observation
    call_ids = io.tokenizer(CALL, add_special_tokens=False)["input_ids"] + [io.eos_id]
    ans_ids = io.tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [io.eos_id]
    obs_len = len(traj.response_ids) - len(call_ids) - len(ans_ids)
    assert traj.loss_mask == [1] * len(call_ids) + [0] * obs_len + [1] * len(ans_ids)
    assert traj.response_ids[:len(call_ids)] == call_ids and traj.response_ids[-len(ans_ids):] == ans_ids
    obs = io.tokenizer.decode(traj.response_ids[len(call_ids):len(call_ids) + obs_len])
    assert obs.startswith("\n<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|>")
    assert obs.endswith("Zoomed in on [10, 20, 90, 80].\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert traj.logprobs == [-0.5] * len(call_ids) + [0.0] * obs_len + [-0.5] * len(ans_ids)
    # the image invariant, counted by hand
    assert traj.input_ids.count(io.image_pad_id) == 54 + 6 == sum(merged_patches(g) for g in grids)
    # the second generate call saw exactly the prompt + first turn + observation, and both images
    assert engine.calls[1][0] == traj.prompt_ids + traj.response_ids[:len(call_ids) + obs_len]
    assert [im.size for im in engine.calls[1][1]] == [(252, 168), (84, 56)]
    assert traj.num_turns == 2 * 1 + 2
    assert traj.finish_reason == "answer"
    assert [(c.name, c.ok, c.executed, c.appended) for c in traj.tool_calls] == [("image_zoom_in_tool", True, True, True)]
    assert traj.crops_returned == 1
    assert set(traj.timings) == {"generate_s", "tool_s", "judge_s", "total_s"}
    assert "<answer>red</answer>" in traj.response_text and "<tool_call>" in traj.response_text


def test_malformed_json_is_an_error_observation(io):
    bad = '<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2\n</tool_call>'
    traj, _, tool = run(io, [bad, ANSWER])
    assert tool.seen == []
    (rec,) = traj.tool_calls
    assert not rec.ok and rec.executed and rec.appended and "not valid JSON" in rec.text
    assert len(traj.images) == 1 and traj.finish_reason == "answer" and traj.num_turns == 4
    assert "not valid JSON" in io.tokenizer.decode(traj.response_ids)


def test_a_tool_that_does_not_answer_in_time_is_an_error_observation(io):
    async def slow(name, image, arguments):  # a tool service that hangs (or a lost replica)
        await asyncio.sleep(5)

    call = '<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 10, 120, 90]}}\n</tool_call>'
    traj, _, _ = run(io, [call, ANSWER], tool=slow, tools_cfg=ToolsConfig(timeout_s=0.05))
    (rec,) = traj.tool_calls
    assert not rec.ok and rec.executed and "did not answer within 0.05 s" in rec.text
    assert traj.finish_reason == "answer" and len(traj.images) == 1


def test_unknown_tool_is_an_error_observation(io):
    traj, _, tool = run(io, ['<tool_call>\n{"name": "rotate", "arguments": {}}\n</tool_call>', ANSWER])
    assert tool.seen == []
    assert traj.tool_calls[0].name == "rotate" and "unknown tool 'rotate'" in traj.tool_calls[0].text


def test_two_calls_in_one_turn_run_only_the_first(io):
    two = ('<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 50, 50]}}\n</tool_call>'
           '<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [50, 50, 120, 120]}}\n</tool_call>')
    traj, _, tool = run(io, [two, ANSWER])
    assert [s[2]["bbox_2d"] for s in tool.seen] == [[0, 0, 50, 50]]
    assert [(c.executed, c.ok) for c in traj.tool_calls] == [(True, True), (False, False)]
    assert len(traj.images) == 2


def test_budget_overflow_exactly_at_an_observation(io):
    # First measure the full episode, then give a budget one token short of fitting the observation.
    full, _, _ = run(io, [CALL, ANSWER])
    call_len = full.loss_mask.index(0)
    obs_len = full.loss_mask[call_len:].index(1)
    cfg = RolloutConfig(max_response_length=call_len + obs_len - 1, max_new_tokens_per_turn=512)
    traj, engine, _ = run(io, [CALL, ANSWER], cfg=cfg)
    assert traj.response_ids == full.response_ids[:call_len] and traj.loss_mask == [1] * call_len
    assert len(traj.images) == 1 and traj.finish_reason == "budget" and len(engine.calls) == 1
    assert traj.tool_calls[0].ok and not traj.tool_calls[0].appended and traj.crops_returned == 0
    # exactly fitting: the observation goes in, no room is left for another turn
    cfg = RolloutConfig(max_response_length=call_len + obs_len, max_new_tokens_per_turn=512)
    traj, engine, _ = run(io, [CALL, ANSWER], cfg=cfg)
    assert len(traj.response_ids) == call_len + obs_len and len(traj.images) == 2
    assert traj.finish_reason == "budget" and len(engine.calls) == 1


def test_turn_cap(io):
    cfg = RolloutConfig(max_assistant_turns=2, max_response_length=4096, max_new_tokens_per_turn=512)
    traj, engine, tool = run(io, [CALL, CALL, ANSWER], cfg=cfg)
    assert len(engine.calls) == 2 and len(tool.seen) == 1
    assert traj.finish_reason == "turn_cap" and traj.num_turns == 1 + 2 + 1
    assert [c.executed for c in traj.tool_calls] == [True, False]
    assert traj.response_ids[-1] == io.eos_id


def test_answer_without_tags_ends_the_episode(io):
    traj, engine, _ = run(io, ["it is red"])
    assert traj.finish_reason == "answer" and traj.num_turns == 2 and traj.tool_calls == []
    assert traj.response_text == "it is red" and traj.loss_mask == [1] * len(traj.response_ids)


def test_turn_cut_at_the_token_cap_ends_the_episode(io):
    cfg = RolloutConfig(max_response_length=4096, max_new_tokens_per_turn=5)
    traj, engine, tool = run(io, [CALL], cfg=cfg)
    assert len(traj.response_ids) == 5 and traj.finish_reason == "length" and tool.seen == []
    cfg = RolloutConfig(max_response_length=5, max_new_tokens_per_turn=512)
    traj, engine, _ = run(io, [CALL], cfg=cfg)
    assert engine.calls[0][2].max_new_tokens == 5 and traj.finish_reason == "budget"


def test_parse_tool_calls_shapes():
    calls = parse_tool_calls('<tool_call>{"name": "image_zoom_in_tool", "arguments": "{\\"bbox_2d\\": [1,2,3,4]}"}</tool_call>'
                             '<tool_call>[1]</tool_call>', ["image_zoom_in_tool"])
    assert calls[0] == ("image_zoom_in_tool", {"bbox_2d": [1, 2, 3, 4]}, None)
    assert calls[1][2] is not None and calls[1][1] is None
    assert parse_tool_calls("<tool_call> unterminated", ["image_zoom_in_tool"]) == []


HUGE_INT = "1" * 5000          # > 4,300 digits: int() refuses it (ValueError, not a JSONDecodeError)
DEEP = "[" * 5000 + "]" * 5000   # nests past the recursion limit (RecursionError)
HOSTILE_CALLS = {
    "huge int": '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [%s, 2, 3, 4]}}' % HUGE_INT,
    "deep": '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": %s}}' % DEEP,
    "huge int in string arguments": '{"name": "image_zoom_in_tool", "arguments": "{\\"bbox_2d\\": [%s, 2, 3, 4]}"}' % HUGE_INT,
    "deep in string arguments": '{"name": "image_zoom_in_tool", "arguments": "%s"}' % DEEP,
    # parses, but 600 levels cannot be pickled back through a Serve handle (pickle's own limit)
    "deep but parseable": '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": %s}}' % ("[" * 600 + "]" * 600),
}


@pytest.mark.parametrize("kind", list(HOSTILE_CALLS))
def test_hostile_tool_call_json_is_an_error_call(kind):
    (call,) = parse_tool_calls(f"<tool_call>{HOSTILE_CALLS[kind]}</tool_call>", ["image_zoom_in_tool"])
    name, args, error = call
    assert args is None and error is not None and error.startswith("Error: ") and len(error) < 300


def test_hostile_tool_call_json_is_an_error_turn_not_a_crash(io):
    import pickle

    texts = [f"<tool_call>{HOSTILE_CALLS[k]}</tool_call>" for k in HOSTILE_CALLS] + [ANSWER]
    cfg = RolloutConfig(max_response_length=60000, max_new_tokens_per_turn=30000, max_prompt_length=8192,
                        max_assistant_turns=len(texts))
    traj, _, tool = run(io, texts, cfg=cfg)
    assert tool.seen == [] and traj.finish_reason == "answer"
    assert [(r.ok, r.executed, r.appended) for r in traj.tool_calls] == [(False, True, True)] * len(HOSTILE_CALLS)
    pickle.dumps(traj)  # what a Serve handle does with it


def test_score_request_carries_calls_and_crops(io):
    from deepeyes.contracts import RewardResult, ScoreRequest

    seen = []
    result = RewardResult(score=1.8, acc=1.0, format=-1.0, tool=1.0)

    async def score(req: ScoreRequest) -> RewardResult:
        seen.append(req)
        return result

    traj, _, _ = run(io, [CALL, ANSWER], score=score)
    (req,) = seen
    assert req.tool_calls == 1 and req.crops == 1 and req.ground_truth == "red" and req.data_source == "vstar"
    assert "<answer>red</answer>" in req.response_text
    assert traj.reward is result  # the judge's typed result, carried as is


def test_with_the_real_zoom_tool_and_registry_schemas(io):
    """The real tool core and the registry's schema (default tool_schemas=None path)."""
    from services.tools.registry import execute_tool

    async def call_tool(name, image, arguments):
        return execute_tool(name, image, arguments)

    cfg = RolloutConfig(max_response_length=4096, max_new_tokens_per_turn=512)
    tiny_box = CALL.replace("[10, 20, 90, 80]", "[100, 100, 110, 105]")  # 10x5: expanded to >= 28
    traj = asyncio.run(run_episode(request(), policy_io=io, generate=ScriptedEngine(io, [tiny_box, ANSWER]),
                                   call_tool=call_tool, score=None, cfg=cfg, tools_cfg=ToolsConfig()))
    assert "image_zoom_in_tool" in io.tokenizer.decode(traj.prompt_ids)  # the registry's schema
    (rec,) = traj.tool_calls
    assert rec.ok and traj.crops_returned == 1
    w, h = traj.images[1].size
    assert min(w, h) >= 28 and w % 28 == 0 and h % 28 == 0


def test_policy_io_from_folder_matches_the_loaded_policy(io, tiny_policy_dir):
    light = PolicyIO.from_folder(tiny_policy_dir)
    assert (light.image_pad_id, light.eos_id, light.pad_id) == (io.image_pad_id, io.eos_id, io.pad_id)
    assert (light.min_pixels, light.max_pixels) == (3136, 50176)
    assert io.image_pad_id in io.banned_ids and io.eos_id not in io.banned_ids


def test_grids_remembered_per_size_equal_the_processors(tiny_policy_dir):
    """PolicyIO.grids asks the processor once per image size; every answer, first or remembered,
    is the processor's own grid for that image."""
    from PIL import Image

    io = PolicyIO.from_policy(load_policy(tiny_policy_dir))
    sizes = [(100, 60), (300, 200), (100, 60), (56, 56), (300, 200), (1000, 17)]
    images = [Image.new("RGB", s, (i * 40, 90, 200)) for i, s in enumerate(sizes)]
    want = io.image_processor(images=images, return_tensors="pt")["image_grid_thw"].tolist()
    assert io.grids(images[:2]) == want[:2]
    assert io.grids(images) == want
    assert io.grids([images[3].convert("L")]) == [want[3]]  # the mode does not change the grid
    assert sorted(io._grids) == sorted(set(sizes))
