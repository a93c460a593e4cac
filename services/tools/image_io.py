"""Encoded images in and out of the tool service, with the size checked before any decoding.

Untrusted bytes (the HTTP route, or a caller that sends bytes instead of an object reference) go
through `decode_image` (`deepeyes.images`, imported here): the byte size, then the pixel count
read from the header, are checked before a single pixel is decoded, so a decompression bomb costs
a header read. Pure Python.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from deepeyes.images import ImageDecodeError, ImageTooLargeError, decode_image

__all__ = ["ImageDecodeError", "ImageTooLargeError", "decode_image", "decode_base64_image", "encode_png"]


def decode_base64_image(text: str, *, max_pixels: int, max_bytes: int | None = None,
                        cap_key: str = "tools.max_image_pixels") -> Image.Image:
    """A base64 string (optionally a `data:image/...;base64,` URL) -> RGB PIL image; see decode_image."""
    if not isinstance(text, str):
        raise ImageDecodeError(f"image must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("image is not valid base64 (standard alphabet, padded)") from None
    return decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes, cap_key=cap_key)


def encode_png(image: Image.Image) -> bytes:
    """A PIL image -> PNG bytes (lossless; what the HTTP route returns)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # speed over size: crops are small
    return buf.getvalue()
