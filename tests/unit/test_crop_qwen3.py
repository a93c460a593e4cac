"""Crop rules on Qwen3-VL's grid (issue 28): frames on a 32 px grid, the 28 px minimum side
unchanged, and 0-1000 relative boxes, checked against values worked out by hand in the comments.
The Qwen2.5-VL vectors live in test_tools_zoom.py and test_crop_mapping.py, unchanged."""

from __future__ import annotations

import pytest
from PIL import Image

from deepeyes.boxes import box_from_frame, box_to_frame
from deepeyes.family import FAMILIES
from deepeyes.policy import resize_for_model, smart_resize_hw
from services.tools.registry import execute_tool
from test_tools_zoom import INVALID, box_of, coded_image

QWEN3 = FAMILIES["qwen3_vl"]


def test_the_families_grids_and_box_scales():
    assert FAMILIES["qwen2_5_vl"].factor == 28 and QWEN3.factor == FAMILIES["qwen3_vl_moe"].factor == 32
    assert FAMILIES["qwen2_5_vl"].box_scale == "absolute" and QWEN3.box_scale == "relative"
    # the reference pixel budgets: 4 to 16,384 tokens, so (32/28)^2 larger for Qwen3-VL
    assert FAMILIES["qwen2_5_vl"].pixel_budget == (3136, 12845056)
    assert QWEN3.pixel_budget == (4096, 16777216)


@pytest.mark.parametrize("hw,factor,want", [
    # 640x480 inside the budget: each side rounds to the nearest multiple of the grid
    ((480, 640), 28, (476, 644)),   # 480/28 = 17.1 -> 17*28; 640/28 = 22.9 -> 23*28
    ((480, 640), 32, (480, 640)),   # both already multiples of 32
    ((100, 150), 32, (96, 160)),    # 3.1 -> 3*32; 4.7 -> 5*32
    ((50, 50), 32, (64, 64)),       # 1.56 -> 2*32 on both sides: 4096 = the minimum area
])
def test_smart_resize_rounds_to_the_family_grid(hw, factor, want):
    lo = 4 * factor * factor
    assert smart_resize_hw(*hw, min_pixels=lo, max_pixels=16384 * factor * factor, factor=factor) == want


def test_a_frame_on_the_32_grid():
    frame = resize_for_model(Image.new("RGB", (1000, 700), (9, 9, 9)), 4096, 200_000, factor=32)
    assert frame.width % 32 == 0 and frame.height % 32 == 0 and frame.width * frame.height <= 200_000


def test_the_28_px_minimum_side_holds_on_a_32_grid_frame():
    frame = coded_image(320, 256)  # a Qwen3-VL frame: 10 x 8 tokens of 32 px
    # a 20 x 50 box: both sides x 28/20 about the centre (110, 75) -> 28 x 70 -> [96, 40, 124, 110],
    # exactly as on Qwen2.5-VL's grid: the minimum is a tool rule, not the patch grid
    assert box_of(execute_tool("image_zoom_in_tool", frame, {"bbox_2d": [100, 50, 120, 100]})) == (96, 40, 124, 110)
    # 28 x 28 is kept as it is, one 32-px token would need a little upscaling by the processor
    assert box_of(execute_tool("image_zoom_in_tool", frame, {"bbox_2d": [0, 0, 28, 28]})) == (0, 0, 28, 28)


def test_relative_boxes_are_thousandths_of_the_frame_sides():
    frame = coded_image(320, 256)
    # 0-1000 relative -> pixels: x * 320 / 1000, y * 256 / 1000; [250, 500, 750, 1000] -> [80, 128, 240, 256]
    r = execute_tool("image_zoom_in_tool", frame, {"bbox_2d": [250, 500, 750, 1000]}, box_scale="relative")
    assert box_of(r) == (80, 128, 240, 256)
    assert r.text == "Zoomed in on the image to the region [250, 500, 750, 1000]."  # as the model wrote it
    # the same region given in pixels cuts the same crop
    assert box_of(execute_tool("image_zoom_in_tool", frame, {"bbox_2d": [80, 128, 240, 256]})) == (80, 128, 240, 256)


def test_relative_boxes_go_through_every_rule_in_pixels():
    frame = coded_image(320, 256)
    # [500, 500, 550, 520] -> [160, 128, 176, 133.12]: 16 x 5.12 px, grown to a 28 px short side about
    # its centre (168, 130.56): scale 28/5.12 = 5.47 -> 87.5 x 28 -> floor/ceil [124, 116, 212, 145]
    assert box_of(execute_tool("image_zoom_in_tool", frame, {"bbox_2d": [500, 500, 550, 520]},
                               box_scale="relative")) == (124, 116, 212, 145)
    # past 1000 is clamped (and grown) exactly as the same box given in pixels: [288, 230.4, 448, 307.2]
    far = execute_tool("image_zoom_in_tool", frame, {"bbox_2d": [900, 900, 1400, 1200]}, box_scale="relative")
    assert box_of(far) == box_of(execute_tool("image_zoom_in_tool", frame, {"bbox_2d": [288, 230.4, 448, 307.2]}))
    assert box_of(far)[2:] == (320, 256)
    # a reversed box is invalid, with the model's numbers shown
    bad = execute_tool("image_zoom_in_tool", frame, {"bbox_2d": [600, 100, 500, 200]}, box_scale="relative")
    assert not bad.ok and bad.text == INVALID.format("[600, 100, 500, 200]")
    # reject30 compares pixels too: 100/1000 of 320 = 32 px, 125/1000 of 256 = 32 px: both > 30
    ok = execute_tool("image_zoom_in_tool", frame, {"bbox_2d": [0, 0, 100, 125]}, box_scale="relative",
                      min_side_policy="reject30")
    assert box_of(ok) == (0, 0, 32, 32)


def test_an_unknown_box_scale_is_a_configuration_error_named():
    r = execute_tool("image_zoom_in_tool", coded_image(64, 64), {"bbox_2d": [0, 0, 40, 40]}, box_scale="pixels")
    assert not r.ok and "tools.box_scale" in r.text


def test_box_scale_round_trip():
    size = (320, 256)
    assert box_to_frame([250, 500, 750, 1000], size, "relative") == [80.0, 128.0, 240.0, 256.0]
    assert box_from_frame([80, 128, 240, 256], size, "relative") == [250, 500, 750, 1000]
    assert box_to_frame([1, 2, 3, 4], size, "absolute") == [1, 2, 3, 4]
    assert box_from_frame([1.4, 2.6, 3, 4], size, "absolute") == [1, 3, 3, 4]
