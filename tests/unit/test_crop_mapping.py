"""Evaluation's opt-in crop of the original: the box the model gave in its frame, mapped to the
original image and cut there (services.tools.zoom.crop_image frame_size, EpisodeRequest.crop_source),
and the tool ablation (EpisodeRequest.use_tools=False). Hand-computed boxes, no Ray."""

from __future__ import annotations

import asyncio
import io as iolib

import numpy as np
import pytest
from PIL import Image

from deepeyes.chat import SYSTEM_PROMPT
from deepeyes.config import RolloutConfig, ToolsConfig
from deepeyes.policy import load_policy
from services.rollout.agent_loop import run_episode
from services.rollout.engines import GenerateResult
from services.rollout.types import EpisodeRequest, PolicyIO
from services.tools.registry import execute_tool
from services.tools.zoom import crop_image, map_box


def coordinate_image(w: int, h: int) -> Image.Image:
    """Red channel = x // 8, green = y // 8: a crop tells where it was cut from."""
    xs = (np.arange(w) // 8 % 256).astype(np.uint8)
    ys = (np.arange(h) // 8 % 256).astype(np.uint8)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = xs[None, :]
    arr[..., 1] = ys[:, None]
    return Image.fromarray(arr)


def test_map_box_by_hand():
    # exact factor 2: 1000x800 original, 500x400 frame
    assert map_box((100, 50, 200, 150), (500, 400), (1000, 800)) == (200, 100, 400, 300)
    # 1000x750 seen as 448x336: factor 1000/448 = 750/336 = 2.2321428...
    # 10*2.232 = 22.32 -> 22; 20*2.232 = 44.64 -> 44; 66*2.232 = 147.32 -> 148; 76*2.232 = 169.64 -> 170
    assert map_box((10, 20, 66, 76), (448, 336), (1000, 750)) == (22, 44, 148, 170)
    # a box at the frame's edge stays inside the original
    assert map_box((420, 308, 448, 336), (448, 336), (1000, 750)) == (937, 687, 1000, 750)


def test_crop_image_cuts_the_original_at_the_mapped_box():
    original = coordinate_image(1000, 800)
    res = crop_image(original, {"bbox_2d": [100, 50, 200, 150]}, frame_size=(500, 400))
    assert res.ok and res.image.size == (200, 200)
    px = np.asarray(res.image)
    assert px[0, 0, 0] == 200 // 8 and px[0, 0, 1] == 100 // 8      # top-left = original (200, 100)
    assert px[-1, -1, 0] == 399 // 8 and px[-1, -1, 1] == 299 // 8  # bottom-right = (399, 299)
    assert "[100, 50, 200, 150]" in res.text  # the text names the box as the model gave it


def test_the_rules_run_in_the_frame_then_map():
    # a 10x10 box in the 500x400 frame is expanded there to 28x28 about its centre (rule 3):
    # centre (105, 105) -> [91, 91, 119, 119] in the frame -> x2 -> [182, 182, 238, 238]
    res = execute_tool("image_zoom_in_tool", coordinate_image(1000, 800), {"bbox_2d": [100, 100, 110, 110]},
                       frame_size=(500, 400))
    assert res.ok and res.image.size == (56, 56)
    assert np.asarray(res.image)[0, 0, 0] == 182 // 8
    # an invalid box in the frame is invalid whatever the original's size
    bad = execute_tool("image_zoom_in_tool", coordinate_image(1000, 800), {"bbox_2d": [600, 0, 700, 50]},
                       frame_size=(500, 400))
    assert not bad.ok and "invalid" in bad.text


class Engine:
    def __init__(self, io, texts):
        self.io, self.texts, self.prompts = io, list(texts), []

    async def __call__(self, prompt_ids, images, sampling):
        self.prompts.append(self.io.tokenizer.decode(prompt_ids))
        ids = self.io.tokenizer(self.texts.pop(0), add_special_tokens=False)["input_ids"] + [self.io.eos_id]
        return GenerateResult(ids, [-0.5] * len(ids), "stop")


@pytest.fixture(scope="module")
def policy_io(tiny_policy_dir):
    return PolicyIO.from_policy(load_policy(tiny_policy_dir))


def _request(image, **kw):
    return EpisodeRequest(uid="e", group_id="g", messages=[
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
        images=[image], ground_truth="red", question="What colour?", **kw)


def test_agent_loop_crops_the_original_when_asked(policy_io):
    original = coordinate_image(1400, 1050)
    frame = policy_io.to_model_frame(original)
    fw, fh = frame.size
    seen = []

    async def tool(name, image, arguments, **options):
        seen.append((image if isinstance(image, Image.Image) else Image.open(iolib.BytesIO(image)), options))
        return execute_tool(name, seen[-1][0], arguments, **options)

    call = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [28, 28, 84, 84]}}</tool_call>'
    buf = iolib.BytesIO()
    original.save(buf, format="PNG")
    for source in (original, buf.getvalue()):  # a PIL image or the encoded file
        seen.clear()
        traj = asyncio.run(run_episode(_request(frame, crop_source=source), policy_io=policy_io,
                                       generate=Engine(policy_io, [call, "<answer>red</answer>"]), call_tool=tool,
                                       score=None, cfg=RolloutConfig(max_response_length=4096),
                                       tools_cfg=ToolsConfig()))
        (img, options), = seen
        assert img.size == (1400, 1050) and options == {"frame_size": (fw, fh)}
        (rec,) = traj.tool_calls
        assert rec.ok and traj.crops_returned == 1
        sx, sy = 1400 / fw, 1050 / fh
        box = map_box((28, 28, 84, 84), (fw, fh), (1400, 1050))
        assert box == (int(28 * sx), int(28 * sy), -int(-84 * sx // 1), -int(-84 * sy // 1))
        # the crop in the trajectory is in the model frame, taken from the original's pixels
        assert traj.images[0].size == (fw, fh)


def test_training_default_crops_the_frame(policy_io):
    frame = policy_io.to_model_frame(coordinate_image(1400, 1050))
    seen = []

    async def tool(name, image, arguments):  # the 3-argument call of today
        seen.append(image.size)
        return execute_tool(name, image, arguments)

    call = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [28, 28, 84, 84]}}</tool_call>'
    asyncio.run(run_episode(_request(frame), policy_io=policy_io,
                            generate=Engine(policy_io, [call, "<answer>red</answer>"]), call_tool=tool, score=None,
                            cfg=RolloutConfig(max_response_length=4096), tools_cfg=ToolsConfig()))
    assert seen == [frame.size]


def test_tools_off_no_tools_block_and_no_call(policy_io):
    called = []

    async def tool(name, image, arguments):
        called.append(name)
        return execute_tool(name, image, arguments)

    call = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 56, 56]}}</tool_call>'
    engine = Engine(policy_io, [call, "<answer>red</answer>"])
    traj = asyncio.run(run_episode(_request(Image.new("RGB", (300, 200)), use_tools=False), policy_io=policy_io,
                                   generate=engine, call_tool=tool, score=None,
                                   cfg=RolloutConfig(max_response_length=4096), tools_cfg=ToolsConfig()))
    assert "<tools>" not in engine.prompts[0] and "# Tools" not in engine.prompts[0]
    assert called == [] and len(engine.prompts) == 1  # the call turn ended the episode
    (rec,) = traj.tool_calls
    assert not rec.executed and rec.text == "tools disabled" and traj.crops_returned == 0
