"""image_zoom_in_tool, rule by rule (docs/design.md, "Crop rules"), with boxes computed by hand in comments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from services.tools.registry import ToolResult, execute_tool, get_tool, tool_schemas
from deepeyes.chat import ZOOM_IN_SCHEMA
from services.tools.zoom import crop_image

INVALID = ("Error: The specified bounding box {} is invalid or results in a crop smaller than the "
           "minimum size of 28x28.")
MALFORMED = "Error: bbox_2d parameter is missing or not a list of 4 numbers."


def coded_image(w: int, h: int) -> Image.Image:
    """Each pixel encodes its own (x, y): R = x % 256, G = y % 256, B = 16*(x//256) + y//256."""
    ys, xs = np.mgrid[0:h, 0:w]
    arr = np.stack([xs % 256, ys % 256, 16 * (xs // 256) + ys // 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def origin(crop: Image.Image) -> tuple[int, int]:
    """The (x, y) in the source image of the crop's top-left pixel."""
    r, g, b = crop.getpixel((0, 0))
    return r + 256 * (b >> 4), g + 256 * (b & 15)


def box_of(result: ToolResult) -> tuple[int, int, int, int]:
    """The crop box (left, top, right, bottom) read back from the pixels of the crop."""
    assert result.ok, result.text
    x, y = origin(result.image)
    w, h = result.image.size
    return x, y, x + w, y + h


IMG448 = coded_image(448, 448)
WIDE = coded_image(3024, 112)     # room for a 2800 x 28 box
TALL = coded_image(112, 3024)


def zoom(image: Image.Image, bbox, **kw) -> ToolResult:
    return crop_image(image, {"bbox_2d": bbox, **kw})


# ---- the schema and the registry ------------------------------------------------------------

def test_schema_is_the_reference_function_schema():
    fn = ZOOM_IN_SCHEMA["function"]
    assert ZOOM_IN_SCHEMA["type"] == "function" and fn["name"] == "image_zoom_in_tool"
    bbox = fn["parameters"]["properties"]["bbox_2d"]
    assert bbox["type"] == "array" and bbox["items"] == {"type": "number"}
    assert bbox["minItems"] == 4 and bbox["maxItems"] == 4 and bbox["description"]
    assert fn["parameters"]["properties"]["label"]["type"] == "string"
    assert fn["parameters"]["required"] == ["bbox_2d"]
    json.dumps(ZOOM_IN_SCHEMA)  # one JSON line per tool in the system turn


def test_registry_lookup_and_schemas():
    assert tool_schemas(["image_zoom_in_tool"]) == [ZOOM_IN_SCHEMA]
    assert get_tool("image_zoom_in_tool").name == "image_zoom_in_tool"
    with pytest.raises(KeyError, match="image_zoom_in_tool"):
        get_tool("no_such_tool")


# ---- rule 1: clamp ----------------------------------------------------------------------------

def test_box_inside_is_cut_exactly():
    # 10..110 x 20..220: w=100, h=200, aspect 2, no expansion.
    assert box_of(zoom(IMG448, [10, 20, 110, 220])) == (10, 20, 110, 220)


def test_box_on_the_whole_border():
    assert box_of(zoom(IMG448, [0, 0, 448, 448])) == (0, 0, 448, 448)


def test_box_past_the_image_is_clamped():
    # left=max(0,-50)=0, top=max(0,-10)=0, right=min(448,500)=448, bottom=min(448,100)=100.
    assert box_of(zoom(IMG448, [-50, -10, 500, 100])) == (0, 0, 448, 100)


def test_negative_corner_clamped_to_zero():
    # [-5,-5,40,40] -> (0,0,40,40): 40x40 >= 28, kept.
    assert box_of(zoom(IMG448, [-5, -5, 40, 40])) == (0, 0, 40, 40)


def test_box_entirely_outside_is_invalid():
    # left=max(0,500)=500 > right=min(448,600)=448 -> invalid.
    r = zoom(IMG448, [500, 10, 600, 100])
    assert not r.ok and r.image is None and r.text == INVALID.format("[500, 10, 600, 100]")


# ---- rule 2: order and aspect -------------------------------------------------------------------

@pytest.mark.parametrize("bbox", [[100, 100, 50, 200], [10, 300, 200, 100], [50, 50, 50, 100]])
def test_reversed_or_empty_corners_invalid(bbox):
    r = zoom(IMG448, bbox)
    assert not r.ok and r.text == INVALID.format(bbox)


def test_aspect_exactly_100_is_valid():
    # w = 2800 - 0 = 2800, h = 28: 2800/28 = 100 <= 100; h=28 is not < 28, so no expansion.
    assert box_of(zoom(WIDE, [0, 0, 2800, 28])) == (0, 0, 2800, 28)
    assert box_of(zoom(TALL, [0, 0, 28, 2800])) == (0, 0, 28, 2800)


@pytest.mark.parametrize("bbox", [[0, 0, 2801, 28], [0, 0, 2800.5, 28], [0, 0, 28, 2801]])
def test_aspect_just_over_100_is_invalid(bbox):
    # 2801/28 = 100.04 and 2800.5/28 = 100.02: both > 100.
    image = TALL if bbox[3] > 2000 else WIDE
    r = zoom(image, bbox)
    assert not r.ok and r.text == INVALID.format(bbox)


# ---- rule 3: expansion of boxes under 28 px ------------------------------------------------------

def test_small_box_expands_about_its_centre():
    # [100,100,110,120]: w=10, h=20, ratio 28/10 = 2.8 -> 28 x 56; centre (105, 110)
    # left = 105-14 = 91, top = 110-28 = 82, right = 119, bottom = 138.
    assert box_of(zoom(IMG448, [100, 100, 110, 120])) == (91, 82, 119, 138)


def test_expansion_floors_left_top_and_ceils_right_bottom():
    # [100.5,100.5,114.5,114.5]: 14x14, ratio 2 -> 28x28 about (107.5, 107.5):
    # left = top = 93.5 -> floor 93; right = bottom = 121.5 -> ceil 122: a 29 x 29 cut.
    assert box_of(zoom(IMG448, [100.5, 100.5, 114.5, 114.5])) == (93, 93, 122, 122)


def test_expansion_at_top_left_shifts_inside():
    # [0,0,14,7]: ratio 28/7 = 4 -> 56 x 28 about (7, 3.5): left = 7-28 = -21 -> 0,
    # top = 3.5-14 = -10.5 -> 0; so (0, 0, 56, 28).
    assert box_of(zoom(IMG448, [0, 0, 14, 7])) == (0, 0, 56, 28)


def test_expansion_at_bottom_right_shifts_inside():
    # [440,444,448,448]: 8x4, ratio 7 -> 56 x 28 about (444, 446): left = 416, 416+56 = 472 > 448
    # -> left = 448-56 = 392; top = 432, 432+28 = 460 > 448 -> top = 420. (392, 420, 448, 448).
    assert box_of(zoom(IMG448, [440, 444, 448, 448])) == (392, 420, 448, 448)


def test_expansion_with_aspect_100_keeps_aspect():
    # [0,0,1400,14] on 3024x112: aspect 100; ratio 2 -> 2800 x 28 about (700, 7):
    # left = -700 -> 0, top = -7 -> 0: (0, 0, 2800, 28), aspect exactly 100.
    assert box_of(zoom(WIDE, [0, 0, 1400, 14])) == (0, 0, 2800, 28)


def test_expansion_rounding_past_aspect_100_is_invalid():
    # [700.5,50,2100.5,64]: 1400 x 14, ratio 2 -> 2800 x 28 about (1400.5, 57):
    # left = 0.5 -> floor 0, right = 2800.5 -> ceil 2801; top 43, bottom 71:
    # 2801 / 28 = 100.04 > 100 -> rule 4 rejects it.
    bbox = [700.5, 50, 2100.5, 64]
    r = zoom(WIDE, bbox)
    assert not r.ok and r.text == INVALID.format(bbox)


def test_expansion_larger_than_image_shrinks_to_fit():
    # Image 100 x 448. [0,200,50.75,214]: 50.75 x 14, ratio 2 -> 101.5 x 28 > W=100:
    # height *= 100/101.5 -> 27.5862..., width = 100. Centre y = 207: top = 207 - 13.7931 = 193.2069
    # -> floor 193; bottom = 220.7931 -> ceil 221: h = 28 (floor/ceil rescue it). left = 25.375-50
    # < 0 -> 0, right = 100. Box (0, 193, 100, 221).
    assert box_of(zoom(coded_image(100, 448), [0, 200, 50.75, 214])) == (0, 193, 100, 221)


def test_expansion_shrunk_below_28_is_invalid():
    # Image 56 x 448. [0,100,20,101]: 20 x 1, ratio 28 -> 560 x 28 > W=56: height *= 0.1 -> 2.8.
    # top = 100.5-1.4 = 99.1 -> 99, bottom = 101.9 -> 102: h = 3 < 28 -> error.
    bbox = [0, 100, 20, 101]
    r = zoom(coded_image(56, 448), bbox)
    assert not r.ok and r.text == INVALID.format(bbox)


# ---- rule 5: the cut ------------------------------------------------------------------------------

def test_fractional_box_is_cut_at_rounded_coordinates():
    # No expansion (100.1 x 199.9). PIL's crop rounds each float (half to even, as Python):
    # round(10.4)=10, round(20.6)=21, round(110.5)=110, round(220.5)=220.
    assert box_of(zoom(IMG448, [10.4, 20.6, 110.5, 220.5])) == (10, 21, 110, 220)


def test_crop_is_native_size_and_from_the_original():
    image = coded_image(448, 448)
    before = image.tobytes()
    first = zoom(image, [0, 0, 224, 224])
    second = zoom(image, [100, 100, 150, 150])  # coordinates of the original, not of `first`
    assert first.image.size == (224, 224)
    assert box_of(second) == (100, 100, 150, 150)
    assert image.tobytes() == before


# ---- texts ------------------------------------------------------------------------------------------

def test_success_text_names_the_region_as_given():
    r = zoom(IMG448, [10.5, 20, 110, 220.0])
    assert r.ok and r.text == "Zoomed in on the image to the region [10.5, 20, 110, 220.0]."


def test_success_text_with_label():
    r = zoom(IMG448, [10, 20, 110, 220], label="red car")
    assert r.text == "Zoomed in on the image to the region [10, 20, 110, 220] with label red car."


def test_empty_label_is_no_label():
    r = zoom(IMG448, [10, 20, 110, 220], label="")
    assert r.text == "Zoomed in on the image to the region [10, 20, 110, 220]."


def test_arguments_as_a_json_string():
    r = crop_image(IMG448, '{"bbox_2d": [10, 20, 110, 220]}')
    assert box_of(r) == (10, 20, 110, 220)


@pytest.mark.parametrize("arguments", [
    {}, {"bbox": [0, 0, 50, 50]}, {"bbox_2d": None}, {"bbox_2d": [1, 2, 3]},
    {"bbox_2d": [1, 2, 3, 4, 5]}, {"bbox_2d": "0, 0, 50, 50"}, {"bbox_2d": ["0", "0", "50", "50"]},
    {"bbox_2d": [0, 0, float("nan"), 50]}, {"bbox_2d": [0, 0, float("inf"), 50]},
    {"bbox_2d": [0, 0, -float("inf"), 50]}, {"bbox_2d": [True, 0, 50, 50]},
    {"bbox_2d": [[0, 0], [50, 50]]}, {"bbox_2d": [0, 0, [50], 50]}, {"bbox_2d": {"x1": 0}},
])
def test_malformed_bbox(arguments):
    r = crop_image(IMG448, arguments)
    assert r == ToolResult(False, MALFORMED)


@pytest.mark.parametrize("arguments", [None, [0, 0, 50, 50], "not json", "[1, 2, 3, 4]", 7])
def test_arguments_not_an_object(arguments):
    r = crop_image(IMG448, arguments)
    assert not r.ok and r.image is None and r.text.startswith("Error: the arguments must be a JSON object")


def test_label_must_be_a_string():
    r = zoom(IMG448, [0, 0, 50, 50], label=["car"])
    assert r == ToolResult(False, "Error: label must be a string (the name of the object in the box) "
                                  "or left out.")


def test_huge_numbers_are_clamped_not_fatal():
    # 10**400 does not fit a float: the clamp compares exactly; right = min(448, 10**400) = 448.
    assert box_of(zoom(IMG448, [-10**400, 0, 10**400, 100])) == (0, 0, 448, 100)
    assert box_of(zoom(IMG448, [-1e308, 0, 1e308, 100])) == (0, 0, 448, 100)


def test_tiny_sides_do_not_overflow():
    # 5e-324 is the smallest float: 28/5e-324 overflows to inf; must be an answer, not an exception.
    bbox = [10, 10, 10 + 5e-324, 10 + 5e-324]
    r = zoom(IMG448, bbox)
    assert not r.ok and r.text.startswith("Error:")


# ---- the reject30 policy (DeepEyes original) ---------------------------------------------------------

def test_reject30_rejects_sides_up_to_30():
    for bbox in ([0, 0, 30, 100], [0, 0, 100, 30], [10, 10, 20, 20]):
        r = crop_image(IMG448, {"bbox_2d": bbox}, min_side_policy="reject30")
        assert r == ToolResult(False, f"Error: The specified bounding box {bbox} is invalid or has a "
                                      f"side of 30 pixels or less (the minimum is 31x31).")


def test_reject30_accepts_31_without_expansion():
    r = crop_image(IMG448, {"bbox_2d": [0, 0, 31, 100]}, min_side_policy="reject30")
    assert box_of(r) == (0, 0, 31, 100)
    # clamp first: left = max(0, -10) = 0, so the side is 31 - 0 = 31.
    r = crop_image(IMG448, {"bbox_2d": [-10, 0, 31, 100]}, min_side_policy="reject30")
    assert box_of(r) == (0, 0, 31, 100)


def test_the_same_small_box_expands_under_the_default_policy():
    # [10,10,20,20]: 10x10, ratio 2.8 -> 28x28 about (15,15): (1, 1, 29, 29).
    assert box_of(zoom(IMG448, [10, 10, 20, 20])) == (1, 1, 29, 29)


def test_unknown_policy_is_a_loud_error():
    with pytest.raises(ValueError, match="min_side_policy"):
        crop_image(IMG448, {"bbox_2d": [0, 0, 50, 50]}, min_side_policy="shrink")


# ---- execute_tool never raises -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["image_zoom_out_tool", "", None, 3, ["image_zoom_in_tool"]])
def test_unknown_tool_names_are_answered(name):
    r = execute_tool(name, IMG448, {"bbox_2d": [0, 0, 50, 50]})
    assert not r.ok and r.text.startswith("Error: unknown tool") and "image_zoom_in_tool" in r.text


def test_execute_tool_turns_exceptions_into_text():
    r = execute_tool("image_zoom_in_tool", "not an image", {"bbox_2d": [0, 0, 50, 50]})
    assert not r.ok and r.text.startswith("Error processing image_zoom_in_tool:")
    r = execute_tool("image_zoom_in_tool", IMG448, {"bbox_2d": [0, 0, 50, 50]}, min_side_policy="bad")
    assert not r.ok and "min_side_policy" in r.text


def test_execute_tool_passes_the_policy():
    r = execute_tool("image_zoom_in_tool", IMG448, {"bbox_2d": [10, 10, 20, 20]},
                     min_side_policy="reject30")
    assert not r.ok and "30 pixels" in r.text
