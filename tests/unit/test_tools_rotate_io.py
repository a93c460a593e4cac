"""image_rotate_tool and the encoded-image guard of the tool service (no Ray)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from deepeyes.images import ImageDecodeError, decode_base64_image, decode_image, encode_png
from services.tools.registry import ToolResult, execute_tool, tool_names, tool_schemas


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# 3 wide x 2 high, every pixel distinct
SMALL = Image.fromarray(np.arange(18, dtype=np.uint8).reshape(2, 3, 3), "RGB")


def test_both_tools_registered():
    assert tool_names() == ["image_rotate_tool", "image_zoom_in_tool"]
    assert [s["function"]["name"] for s in tool_schemas(["image_rotate_tool"])] == ["image_rotate_tool"]


def test_rotate_90_is_counter_clockwise():
    r = execute_tool("image_rotate_tool", SMALL, {"angle": 90})
    assert r.ok and r.text == "Rotated the image by 90 degrees counter-clockwise."
    # Counter-clockwise by 90: the top-right pixel (2, 0) becomes the top-left; size 2 x 3.
    assert r.image.size == (2, 3)
    assert r.image.getpixel((0, 0)) == SMALL.getpixel((2, 0))
    assert r.image.getpixel((0, 2)) == SMALL.getpixel((0, 0))


def test_rotate_angles_modulo_360():
    a = execute_tool("image_rotate_tool", SMALL, {"angle": -90}).image
    b = execute_tool("image_rotate_tool", SMALL, {"angle": 270}).image
    assert a.tobytes() == b.tobytes() and a.getpixel((0, 0)) == SMALL.getpixel((0, 1))
    assert execute_tool("image_rotate_tool", SMALL, {"angle": 360}).image.tobytes() == SMALL.tobytes()


def test_rotate_arbitrary_angle_expands_canvas():
    image = Image.new("RGB", (100, 100), "white")
    r = execute_tool("image_rotate_tool", image, {"angle": 45.0})
    # a 100 x 100 square turned by 45 degrees needs about 100*sqrt(2) = 141.4 px
    assert r.ok and 140 <= r.image.width <= 143 and r.image.width == r.image.height
    assert r.text == "Rotated the image by 45 degrees counter-clockwise."


@pytest.mark.parametrize("arguments", [{}, {"angle": "90"}, {"angle": float("nan")}, {"angle": True},
                                       {"angle": [90]}, None, "junk"])
def test_rotate_bad_angle(arguments):
    r = execute_tool("image_rotate_tool", SMALL, arguments)
    assert r == ToolResult(False, "Error: angle parameter is missing or not a number "
                                  "(degrees, counter-clockwise).")


# ---- decode_image ---------------------------------------------------------------------------------

def test_decode_roundtrip_png():
    image = Image.new("RGB", (64, 32), (1, 2, 3))
    out = decode_image(png_bytes(image), max_pixels=10_000)
    assert out.mode == "RGB" and out.size == (64, 32) and out.getpixel((5, 5)) == (1, 2, 3)
    assert decode_image(encode_png(image), max_pixels=10_000).tobytes() == image.tobytes()


def test_decode_converts_to_rgb():
    out = decode_image(png_bytes(Image.new("LA", (8, 8), (200, 255))), max_pixels=100)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (200, 200, 200)


def test_pixel_cap_is_checked_from_the_header():
    with pytest.raises(ImageDecodeError, match="over the cap of 2047"):
        decode_image(png_bytes(Image.new("RGB", (64, 32))), max_pixels=2047)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height with one tiny (invalid) IDAT: a bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_before_decoding():
    # 10^8 pixels announced in under 200 bytes: over our cap, under PIL's own bomb limit.
    data = bomb_png(20_000, 5_000)
    assert len(data) < 200
    with pytest.raises(ImageDecodeError, match="100000000 pixels, over the cap of 64000000"):
        decode_image(data, max_pixels=64_000_000)
    # 10^10 pixels: PIL's own bomb check fires at open; still an answer, not a crash.
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bomb_png(100_000, 100_000), max_pixels=64_000_000)


def test_byte_cap():
    with pytest.raises(ImageDecodeError, match="over the cap of 10"):
        decode_image(png_bytes(Image.new("RGB", (8, 8))), max_pixels=100, max_bytes=10)


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\n"])
def test_not_an_image(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data, max_pixels=1000)


def test_truncated_image():
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], max_pixels=10_000)


def test_not_bytes():
    with pytest.raises(ImageDecodeError, match="expected encoded image bytes"):
        decode_image("abc", max_pixels=10)  # type: ignore[arg-type]


def test_base64_and_data_url():
    data = png_bytes(Image.new("RGB", (4, 4), (9, 9, 9)))
    text = base64.b64encode(data).decode()
    assert decode_base64_image(text, max_pixels=100).size == (4, 4)
    assert decode_base64_image("data:image/png;base64," + text, max_pixels=100).size == (4, 4)
    with pytest.raises(ImageDecodeError, match="not valid base64"):
        decode_base64_image("***", max_pixels=100)
