"""Encoded images in, with the size checked before any decoding (the one decoder of untrusted bytes).

`to_rgb` is the project's one conversion to RGB: transparent pixels are composited over white, as
Qwen's own `qwen_vl_utils.to_rgb` does (a plain `convert("RGB")` drops alpha and shows the stored
colour, often black). `decode_image` checks the byte size, then the pixel count read from the header, before a single
pixel is decoded, so a decompression bomb costs a header read. Its callers: the tool service's
HTTP route and byte arguments (`decode_base64_image`), and the data rows (`deepeyes.data.Row`).
Pure Python, PIL only.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hashlib
import io
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """The bytes are not an image we accept; the message names the cause and the fix."""


class ImageTooLargeError(ImageDecodeError):
    """The encoded size or the header's pixel count is over its cap (the tool route answers 413)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, pixels with alpha (RGBA, LA, PA, P or RGB with a transparency key)
    composited over white; an RGB image without transparency comes back as is."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.has_transparency_data:
        # Paste through the alpha mask onto white, as qwen_vl_utils.to_rgb: one RGB frame and one
        # RGBA copy, where alpha_composite held three RGBA frames (on a 36 M-pixel image, 0.3 GB
        # instead of 0.5 GB at the peak).
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None,
                 cap_key: str = "tools.max_image_pixels") -> Image.Image:
    """Bytes of an encoded image (PNG, JPEG, WebP, ...) -> an RGB PIL image (`to_rgb`), first frame.

    Args:
        data: the encoded image.
        max_pixels: width*height cap, read from the header before decoding.
        max_bytes: encoded size cap (None = no cap).
        cap_key: the config key of `max_pixels`, named in the too-large message.

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
                                       f"{max_pixels} ({cap_key}): downscale it first")
            image.load()
            return to_rgb(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("the bytes are not an image PIL can read (send PNG, JPEG or WebP)") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {e}") from None
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, struct.error, ... on bad bytes
        raise ImageDecodeError(f"image is truncated or corrupt ({type(e).__name__}: {e})"[:500]) from None


_LIBC = None


def trim_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A decoded image lives in blocks that glibc keeps in the decoding thread's arena after they are
    freed: without a trim, a replica that decoded one 35 M-pixel image keeps its ~0.4 GB as RSS.
    """
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def image_key(image: Image.Image) -> tuple[Any, ...]:
    """Equal for two images with the same size, mode and pixels (a 128-bit digest of the pixels)."""
    return image.size, image.mode, hashlib.blake2b(image.tobytes(), digest_size=16).digest()


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
