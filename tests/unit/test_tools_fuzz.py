"""Property-based fuzzing of the tool core: every input is answered with a crop or an error text."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.tools.registry import execute_tool
from services.tools.zoom import crop_image

W, H = 84, 56  # small and non-square: fast, and both clamps matter
_ys, _xs = np.mgrid[0:H, 0:W]
IMAGE = Image.fromarray(np.stack([_xs, _ys, np.zeros_like(_xs)], -1).astype(np.uint8), "RGB")

numbers = st.one_of(
    st.integers(-200, 200),
    st.floats(-200, 200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10**30, 10**30),
    st.sampled_from([0, 27, 28, 29, 30, 31, W, H, 0.5, 27.999, 1e-300, 5e-324, 1e308, 10**400]),
)
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.text(max_size=8), numbers),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
bboxes = st.one_of(
    st.lists(numbers, min_size=4, max_size=4),  # mostly well-formed
    st.lists(numbers, min_size=4, max_size=4),
    st.lists(st.one_of(numbers, junk), min_size=0, max_size=6),
    junk,
)
arguments = st.one_of(
    st.fixed_dictionaries({"bbox_2d": bboxes}, optional={"label": st.one_of(st.text(max_size=12), junk)}),
    st.fixed_dictionaries({"bbox_2d": bboxes}),
    junk,
    st.text(max_size=40),
)
names = st.one_of(st.just("image_zoom_in_tool"), st.just("image_zoom_in_tool"), st.just("image_rotate_tool"), junk)
policies = st.sampled_from(["expand", "reject30"])


def check_answer(result, policy: str) -> None:
    if result.ok:
        assert result.text.startswith(("Zoomed in on the image", "Rotated the image"))
        w, h = result.image.size
        assert w >= 1 and h >= 1 and max(w, h) / min(w, h) < 200  # the processor's hard limit
        if result.text.startswith("Zoomed"):
            assert w <= W and h <= H and min(w, h) >= 28
            assert max(w, h) / min(w, h) <= 101  # rule 2 on the box; round() moves a side by < 1
            if policy == "reject30":
                assert min(w, h) >= 30
    else:
        assert result.image is None and result.text.startswith("Error") and len(result.text) < 2000


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=names, args=arguments, policy=policies)
def test_fuzz_every_call_is_answered(name, args, policy):
    if name == "image_zoom_in_tool":
        # the core itself, not behind execute_tool's catch-all: any exception fails this test
        check_answer(crop_image(IMAGE, args, min_side_policy=policy), policy)
    result = execute_tool(name, IMAGE, args, min_side_policy=policy)
    assert not result.text.startswith("Error processing")  # no tool raised inside
    check_answer(result, policy)


@settings(max_examples=2_000, deadline=None)
@given(x1=st.integers(0, W - 28), y1=st.integers(0, H - 28), w=st.integers(28, W), h=st.integers(28, H))
def test_valid_integer_boxes_are_cut_exactly(x1, y1, w, h):
    # Oracle: a box inside the image with both sides >= 28 is cut as given (after the clamp).
    x2, y2 = x1 + w, y1 + h
    r = execute_tool("image_zoom_in_tool", IMAGE, {"bbox_2d": [x1, y1, x2, y2]})
    right, bottom = min(W, x2), min(H, y2)
    assert r.ok and r.image.size == (right - x1, bottom - y1)
    assert r.image.getpixel((0, 0))[:2] == (x1, y1)


@settings(max_examples=2_000, deadline=None)
@given(x1=st.floats(-20, W + 20), y1=st.floats(-20, H + 20), w=st.floats(0.01, 40), h=st.floats(0.01, 40))
def test_expanded_boxes_contain_the_clamped_box(x1, y1, w, h):
    # Oracle: rule 3 grows a box about its centre and only shifts it to stay inside, so whenever
    # the expanded box is not shrunk (it fits), it contains the clamped original box.
    left, top, right, bottom = max(0, x1), max(0, y1), min(W, x1 + w), min(H, y1 + h)
    r = execute_tool("image_zoom_in_tool", IMAGE, {"bbox_2d": [x1, y1, x1 + w, y1 + h]})
    if not r.ok:
        return
    cx, cy = r.image.getpixel((0, 0))[:2]
    cw, ch = r.image.size
    assert cx <= math.floor(left) + 1 and cy <= math.floor(top) + 1
    assert cx + cw >= math.ceil(right) - 1 and cy + ch >= math.ceil(bottom) - 1
