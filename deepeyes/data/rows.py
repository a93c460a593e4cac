"""DeepEyes-schema rows: the schema's constants, the checked `Row`, and `parse_row`, which turns one
parquet record into a Row or raises `RowSkipped` naming why the record is unusable.

The checks run cheapest first: image pixel counts are read from the header (PIL's lazy open) before
anything is decoded, so a decompression bomb costs a header parse. Rows keep the encoded image bytes
and decode on access (`Row.images`); tiny images come back upscaled to `min_image_side`.
"""

from __future__ import annotations

import collections
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from deepeyes.chat import SYSTEM_PROMPT, SYSTEM_PROMPT_AGENTIC
from deepeyes.config import DataConfig
from deepeyes.images import decode_image

IMAGE_MARKER = "<image>"
SOURCES = ("vstar", "thinklite_eureka", "chart")
# The real dataset's file names; the synthetic suite uses the same ones.
VSTAR_FILE = "data_0.1.2_visual_toolbox_v2.parquet"
THINKLITE_FILE = "data_thinklite_reasoning_acc.parquet"
CHART_FILE = "data_v0.8_visual_toolbox_v2.parquet"
TOOL_ENV = "visual_toolbox_v2"
READ_BATCH_ROWS = 32  # rows decoded from parquet at a time (one batch of bytes in memory)
MAX_ASPECT_RATIO = 200  # the Qwen2-VL image processor rejects ratios of 200 or more

# Why a row is skipped, and what a user can do about it (logged with the first occurrence).
SKIP_REASONS: dict[str, str] = {
    "chart_excluded": "Chart rows are off by default (very high resolution); set data.include_chart=true",
    "malformed_prompt": "prompt must be a list of {role, content} with a user turn whose content is text",
    "missing_ground_truth": "reward_model.ground_truth is missing or empty; fix the row or drop it",
    "missing_image": "images must be a non-empty list of {bytes, path} with embedded bytes",
    "image_count_mismatch": "the user text must hold one <image> marker per entry of images",
    "image_too_many_bytes": "an encoded image exceeds data.max_image_bytes; raise it or drop the row",
    "image_too_many_pixels": "an image exceeds data.max_image_pixels (read from its header); raise it "
                             "or drop the row",
    "undecodable_image": "image bytes are not a decodable image (corrupt or truncated)",
    "extreme_aspect_ratio": f"an image has long/short side >= {MAX_ASPECT_RATIO}, which the Qwen2-VL "
                            "processor rejects",
    "bad_target_bbox": "extra_info.target_bbox must be [x1, y1, x2, y2] inside the first image",
}


class RowSkipped(Exception):
    """A row that cannot be used; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail




def upscale_to_min_side(image: Image.Image, min_side: int) -> Image.Image:
    """Scale up so the short side is `min_side`, aspect kept (long side rounded half up)."""
    w, h = image.size
    if min(w, h) >= min_side:
        return image
    scale = min_side / min(w, h)
    if w <= h:
        size = (min_side, max(min_side, int(h * scale + 0.5)))
    else:
        size = (max(min_side, int(w * scale + 0.5)), min_side)
    return image.resize(size, Image.Resampling.BICUBIC)


@dataclass
class Row:
    """One validated prompt: the chat messages, the image bytes, the reference answer.

    `images` decodes on each access (RGB, tiny ones upscaled, not yet smart-resized): hold the
    result rather than reading the property in a loop. `image_sizes` are the stored (w, h) before
    any upscale; `extra["target_bbox"]`, when present, is in those original pixels. `ability` and
    `env_name` are the DeepEyes columns as stored (`inspect` counts them: env_name marks tool rows).
    """

    index: str
    data_source: str
    messages: list[dict[str, Any]]
    image_bytes: list[bytes]
    ground_truth: str
    question: str
    extra: dict[str, Any]
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    ability: str = ""
    env_name: str = ""
    min_image_side: int = DataConfig.min_image_side
    max_image_pixels: int = DataConfig.max_image_pixels
    position: int = -1  # raw row number in its ParquetRows (the stream's order is over these)

    @property
    def images(self) -> list[Image.Image]:
        # read_deepeyes checked these bytes already; the one decoder checks the cap again anyway.
        return [upscale_to_min_side(decode_image(b, max_pixels=self.max_image_pixels,
                                                 cap_key="data.max_image_pixels"), self.min_image_side)
                for b in self.image_bytes]


@dataclass
class DataSet:
    """Rows read from parquet files, plus how many rows were skipped for which reason."""

    rows: list[Row] = field(default_factory=list)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]

    def summary(self) -> str:
        by_source = collections.Counter(r.data_source for r in self.rows)
        kept = ", ".join(f"{k}={v}" for k, v in sorted(by_source.items())) or "none"
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{len(self.rows)} rows from {len(self.files)} file(s) (by source: {kept}); "
                f"skipped {sum(self.skipped.values())} ({skipped})")


def is_chart_file(path: str | os.PathLike[str]) -> bool:
    """The real Chart file is named data_v0.8_*; its rows are also caught by data_source."""
    return "data_v0.8" in Path(path).name


def _user_messages(prompt: Any) -> list[dict[str, Any]]:
    """Parse the prompt list; raises RowSkipped('malformed_prompt') when it has no text user turn."""
    if not isinstance(prompt, list) or not prompt:
        raise RowSkipped("malformed_prompt", f"prompt is {type(prompt).__name__}, not a list of turns")
    turns = [t for t in prompt if isinstance(t, dict) and t.get("role") != "system"]
    if not any(t.get("role") == "user" for t in turns):
        raise RowSkipped("malformed_prompt", "no user turn")
    for t in turns:
        if not isinstance(t.get("content"), str):
            raise RowSkipped("malformed_prompt", f"{t.get('role')} turn content is not text")
    return turns


def _content_parts(text: str) -> list[dict[str, Any]]:
    """'<image>\\nWhat is...' -> [{'type': 'image'}, {'type': 'text', 'text': 'What is...'}]."""
    parts: list[dict[str, Any]] = []
    pieces = text.split(IMAGE_MARKER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
        piece = piece.strip()
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _check_image(data: Any, cfg: DataConfig) -> tuple[int, int]:
    """Validate one encoded image cheaply-first; returns its (w, h). Raises RowSkipped."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise RowSkipped("missing_image", "image entry has no bytes")
    if len(data) > cfg.max_image_bytes:
        raise RowSkipped("image_too_many_bytes", f"{len(data)} bytes > cap {cfg.max_image_bytes}")
    with warnings.catch_warnings():
        # Our own cap below is the check that matters; PIL's warning is noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except Image.DecompressionBombError as e:
            raise RowSkipped("image_too_many_pixels", f"PIL refused the header: {e}") from None
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad row, not a crash
            raise RowSkipped("undecodable_image", f"{type(e).__name__}: {e}") from None
        w, h = image.size
        if w <= 0 or h <= 0:
            raise RowSkipped("undecodable_image", f"header size {w}x{h}")
        if w * h > cfg.max_image_pixels:
            raise RowSkipped("image_too_many_pixels", f"{w}x{h} = {w * h} pixels > cap {cfg.max_image_pixels}")
        if max(w, h) / min(w, h) >= MAX_ASPECT_RATIO:
            raise RowSkipped("extreme_aspect_ratio", f"{w}x{h}")
        try:
            if image.format == "JPEG":
                # DCT-domain downscale: still reads the whole stream (catches truncation), 64x cheaper.
                image.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            image.load()
        except Exception as e:  # noqa: BLE001
            raise RowSkipped("undecodable_image", f"{type(e).__name__}: {e}") from None
    return w, h


def _check_bbox(bbox: Any, size: tuple[int, int]) -> list[float]:
    w, h = size
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise RowSkipped("bad_target_bbox", f"{bbox!r} is not 4 numbers") from None
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise RowSkipped("bad_target_bbox", f"{bbox!r} not inside the {w}x{h} image")
    return [x1, y1, x2, y2]


def parse_row(record: dict[str, Any], where: str, cfg: DataConfig) -> Row:
    """One parquet record -> Row; raises RowSkipped naming why the record is unusable.

    The system turn is replaced by `deepeyes.chat.SYSTEM_PROMPT` (SYSTEM_PROMPT_AGENTIC for a row
    whose extra_info.tools holds the python tool); each other turn becomes a content
    list (`{"type": "image"}` parts where the markers were, `{"type": "text"}` parts between)."""
    source = str(record.get("data_source") or "")
    if source == "chart" and not cfg.include_chart:
        raise RowSkipped("chart_excluded", "data_source is chart")
    turns = _user_messages(record.get("prompt"))
    reward = record.get("reward_model") or {}
    truth = reward.get("ground_truth") if isinstance(reward, dict) else None
    if truth is None or str(truth).strip() == "":
        raise RowSkipped("missing_ground_truth", "reward_model.ground_truth is empty")
    entries = record.get("images")
    if not isinstance(entries, list) or not entries:
        raise RowSkipped("missing_image", "images is empty")
    blobs = [e.get("bytes") if isinstance(e, dict) else None for e in entries]
    markers = sum(t["content"].count(IMAGE_MARKER) for t in turns)
    if markers != len(blobs):
        raise RowSkipped("image_count_mismatch", f"{markers} <image> marker(s) for {len(blobs)} image(s)")
    sizes = [_check_image(b, cfg) for b in blobs]
    extra = dict(record.get("extra_info") or {})
    if extra.get("target_bbox") is not None:
        extra["target_bbox"] = _check_bbox(extra["target_bbox"], sizes[0])

    agentic = "python" in (extra.get("tools") or ())  # a DeepEyesV2 row: the code tool's system turn
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT_AGENTIC if agentic else SYSTEM_PROMPT}]
    messages += [{"role": t["role"], "content": _content_parts(t["content"])} for t in turns]
    question = extra.get("question")
    if not isinstance(question, str) or not question.strip():
        question = " ".join(p["text"] for t in messages[1:] for p in t["content"] if p["type"] == "text")
    question = question.replace(IMAGE_MARKER, "").strip()
    return Row(index=str(extra["index"]) if extra.get("index") is not None else where,
               data_source=source, messages=messages, image_bytes=[bytes(b) for b in blobs],
               ground_truth=str(truth).strip(), question=question, extra=extra, image_sizes=sizes,
               ability=str(record.get("ability") or ""), env_name=str(record.get("env_name") or ""),
               min_image_side=cfg.min_image_side, max_image_pixels=cfg.max_image_pixels)
