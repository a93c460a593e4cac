"""Encoded images in and out of the tool service, with the size checked before any decoding.

Untrusted bytes (the HTTP route, or a caller that sends bytes instead of an object reference) go
through `decode_image`: the byte size, then the pixel count read from the header, are checked
before a single pixel is decoded, so a decompression bomb costs a header read. Pure Python.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """The bytes are not an image we accept; the message names the cause and the fix."""


class ImageTooLargeError(ImageDecodeError):
    """The encoded size or the header's pixel count is over its cap (HTTP 413)."""


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Bytes of an encoded image (PNG, JPEG, WebP, ...) -> an RGB PIL image, first frame.

    Args:
        data: the encoded image.
        max_pixels: width*height cap, read from the header before decoding.
        max_bytes: encoded size cap (None = no cap).

    Raises:
        ImageDecodeError: not bytes, too large, not an image, truncated or corrupt.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageTooLargeError(f"image is {len(data)} bytes, over the cap of {max_bytes}: "
                               f"send a smaller or more compressed image")
    try:
        with warnings.catch_warnings():
            # Our own cap below is the bomb check; PIL's warning would only add log noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
            w, h = image.size
            if w <= 0 or h <= 0:
                raise ImageDecodeError(f"image header says {w}x{h}: not a usable image")
            if w * h > max_pixels:
                raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels, over the cap of "
                                       f"{max_pixels} (tools.max_image_pixels): downscale it first")
            image.load()
            return image.convert("RGB") if image.mode != "RGB" else image
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("the bytes are not an image PIL can read (send PNG, JPEG or WebP)") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {e}") from None
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, struct.error, ... on bad bytes
        raise ImageDecodeError(f"image is truncated or corrupt ({type(e).__name__}: {e})"[:500]) from None


def decode_base64_image(text: str, *, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """A base64 string (optionally a `data:image/...;base64,` URL) -> RGB PIL image; see decode_image."""
    if not isinstance(text, str):
        raise ImageDecodeError(f"image must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("image is not valid base64 (standard alphabet, padded)") from None
    return decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)


def encode_png(image: Image.Image) -> bytes:
    """A PIL image -> PNG bytes (lossless; what the HTTP route returns)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # speed over size: crops are small
    return buf.getvalue()
