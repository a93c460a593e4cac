"""The data pipeline: DeepEyes-schema parquet in, validated prompt rows out; plus a synthetic twin.

Reading (`read_deepeyes(files, cfg)`): the DeepEyes-Datasets-47k columns `data_source`, `prompt`
(system + user turns; the user text holds one `<image>` marker per image), `images` (list of
{bytes, path}), `reward_model` ({ground_truth, style}), `extra_info` ({answer, question, index,
split, ...}), `ability`, `env_name`. Files stream through pyarrow in row batches. Every row is
checked before it is kept; a malformed row is skipped, counted under a named reason (`SKIP_REASONS`)
and logged once per reason, never a crash. Image pixel counts are read from the header (PIL's lazy
open) before anything is decoded, so a decompression bomb costs a header parse. Rows keep the
encoded image bytes (the size of the parquet, not of the decoded pixels) and decode on access
(`Row.images`); tiny images come back upscaled so their short side is `min_image_side`.

The system turn is replaced by `deepeyes.chat.SYSTEM_PROMPT`; the user turn becomes a content list
(`{"type": "image"}` parts where the markers were, `{"type": "text"}` parts for the text between).

Synthetic data (`write_synthetic`, `write_synthetic_suite`) writes the same
schema, deterministically (same seed, same bytes):
- `vstar`: a 1024-2048 px cluttered scene with ONE small target (a coloured shape, a word on a
  coloured sign, or a striped square in a coloured frame) whose asked attribute (shape / word /
  stripe orientation) is below 6 px in the model's 224x224-ish frame but plain in a native crop;
- `thinklite_eureka`: 8-27 px images of 1-3 dark dots and an arithmetic question (number answer);
- `chart`: 3000-4096 px flat-colour bar charts with small value labels to read;
- `zoom` (not in the suite; `data.synthetic_task=zoom`): the main job's task, which way the
  stripes inside a red frame run, readable only in a crop cut from the original (`_zoom_task`);
  the question names the frame's quarter. `zoom_find` is the same scene with no place named.

Answer convention: `reward_model.ground_truth` is the answer WORD (or number), never an option
letter; multiple-choice questions list `(A) word (B) word ...` and `extra_info.options` keeps the
list, so a judge can map a letter answer to its word. `extra_info.target_bbox` is [x1, y1, x2, y2]
in original image pixels (x2, y2 exclusive, a PIL crop box); `extra_info.target_attribute` names
what is asked.

CLI: `python -m deepeyes.data synth --out DIR --rows N --seed S` and
`python -m deepeyes.data inspect FILE...`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import logging
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from deepeyes.chat import SYSTEM_PROMPT
from deepeyes.config import DEFAULT_MAX_PIXELS, DataConfig
from deepeyes.images import decode_image

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# rows


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
    """One parquet record -> Row; raises RowSkipped naming why the record is unusable."""
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

    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
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


ROW_COLUMNS = ("data_source", "prompt", "images", "reward_model", "extra_info", "ability", "env_name")
REQUIRED_COLUMNS = {"data_source", "prompt", "images", "reward_model"}
SAMPLE_CHECK_ROWS = 8  # rows of each file parsed at start (ParquetRows.sample_check): a bounded decode


class SkipCounter:
    """Skipped rows by reason; the first row of each reason is logged with what a user can do."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, reason: str, detail: str, where: str, count: int = 1) -> None:
        if count == 0:
            return
        if reason not in self.counts:
            log.warning("skipping %s: %s (%s). %s. Further rows with this reason are only counted.",
                        where, reason, detail, SKIP_REASONS[reason])
        self.counts[reason] += count


@dataclass
class _Group:
    """One parquet row group: raw rows [start, start + rows) of the stream."""

    file: int
    group: int
    start: int
    rows: int


def _open_parquet(path: str) -> pq.ParquetFile:
    """A local path or any URI pyarrow's filesystems accept (s3://, gs://, hdfs://, file://)."""
    if "://" in path:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        try:
            return pq.ParquetFile(filesystem.open_input_file(inner))
        except FileNotFoundError:
            raise FileNotFoundError(f"data file {path} does not exist; check data.train_files / "
                                    "data.val_files (empty lists mean synthetic data)") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist; check data.train_files / "
                                "data.val_files (empty lists mean synthetic data)")
    return pq.ParquetFile(path)


class ParquetRows:
    """DeepEyes-schema parquet files as raw rows read lazily, one row group at a time.

    Opening reads metadata only: every file's schema is checked (a file lacking a required column
    fails at once), the Chart file is left out whole (counted) unless data.include_chart, and the
    row groups are indexed. Raw row r is the r-th row of the kept files in the order given. Rows
    are parsed and checked (`parse`) when they are used, so a bad row is skipped and counted in
    `skipped` when it streams by, with the same reasons and messages as a full read.
    Row ids are `extra_info.index`; an id already taken by another raw row gets `file:rownum`.
    """

    def __init__(self, files: list[str], cfg: DataConfig) -> None:
        if cfg.max_image_pixels > (Image.MAX_IMAGE_PIXELS or 0) and Image.MAX_IMAGE_PIXELS is not None:
            # PIL refuses images above 2x its own limit at open; our configured cap is the rule here.
            Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
        self.cfg = cfg
        self.files = [str(f) for f in files]
        self.skipped = SkipCounter()
        self.groups: list[_Group] = []
        self._handles: dict[int, pq.ParquetFile] = {}
        self._columns: dict[int, list[str]] = {}
        self._file_start: dict[int, int] = {}
        self._ids: dict[str, int] = {}
        self._bad: set[int] = set()  # raw rows found unusable
        self._dup_logged = False
        start = 0
        for i, path in enumerate(self.files):
            pf = _open_parquet(path)
            total = pf.metadata.num_rows
            if is_chart_file(path) and not cfg.include_chart:
                self.skipped("chart_excluded", f"whole file, {total} rows", Path(path).name, count=total)
                continue
            columns = set(pf.schema_arrow.names)
            missing = REQUIRED_COLUMNS - columns
            if missing:
                raise ValueError(f"{path} lacks column(s) {sorted(missing)}: not a DeepEyes-schema parquet "
                                 f"(has {sorted(columns)})")
            self._handles[i] = pf
            self._columns[i] = [c for c in ROW_COLUMNS if c in columns]
            self._file_start[i] = start
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if n:
                    self.groups.append(_Group(i, g, start, n))
                    start += n
        self.num_rows = start

    def __len__(self) -> int:
        """Raw rows in the kept files (bad rows among them are skipped when they stream by)."""
        return self.num_rows

    def read_group(self, gi: int) -> list[dict[str, Any]]:
        g = self.groups[gi]
        return self._handles[g.file].read_row_group(g.group, columns=self._columns[g.file]).to_pylist()

    def parse(self, raw: int, record: dict[str, Any], group: _Group) -> Row | None:
        """The checked row of raw row `raw`, or None (skipped; counted the first time only, so
        the counts are the data's bad rows however many epochs pass over them)."""
        if raw in self._bad:
            return None
        name = Path(self.files[group.file]).name
        where = f"{name}:{raw - self._file_start[group.file]}"
        try:
            row = parse_row(record, where, self.cfg)
        except RowSkipped as e:
            self._bad.add(raw)
            self.skipped(e.reason, e.detail, where)
            return None
        if self._ids.setdefault(row.index, raw) != raw:
            # Real files number rows per file, so ids repeat across files; GRPO groups by id,
            # so repeats must not merge.
            if not self._dup_logged:
                log.info("extra_info.index %s repeats (at %s); repeats get file:rownum ids", row.index, where)
                self._dup_logged = True
            row.index = where
        row.position = raw
        return row

    def iter_rows(self, progress: bool = False) -> Iterator[Row]:
        """Every usable row in file order, one row group in memory at a time."""
        with tqdm(total=self.num_rows, desc="rows", unit="row", disable=None if progress else True,
                  leave=False) as bar:
            for gi, g in enumerate(self.groups):
                for k, record in enumerate(self.read_group(gi)):
                    row = self.parse(g.start + k, record, g)
                    if row is not None:
                        yield row
                bar.update(g.rows)

    def sample_check(self, rows_per_file: int = SAMPLE_CHECK_ROWS) -> collections.Counter[str]:
        """Parse the first rows of every kept file (a bounded decode, counted apart from `skipped`);
        returns the skip reasons seen. Raises ValueError when no sampled row is usable."""
        seen: collections.Counter[str] = collections.Counter()
        usable = 0
        first_groups = {}
        for gi, g in enumerate(self.groups):
            first_groups.setdefault(g.file, gi)
        for f, gi in first_groups.items():
            g = self.groups[gi]
            table = self._handles[f].read_row_group(g.group, columns=self._columns[f]).slice(0, rows_per_file)
            for k, record in enumerate(table.to_pylist()):
                try:
                    parse_row(record, f"{Path(self.files[f]).name}:{k}", self.cfg)
                    usable += 1
                except RowSkipped as e:
                    seen[e.reason] += 1
        if self.num_rows and not usable:
            raise ValueError(f"no usable row among the first {rows_per_file} of each file of {self.files}: "
                             + ", ".join(f"{k}={v} ({SKIP_REASONS[k]})" for k, v in sorted(seen.items())))
        return seen


class RowStream:
    """The seeded epoch-wise order of a ParquetRows, read with bounded memory; (epoch, pos) resumes it.

    An epoch's order: the row groups in a seeded permutation, their raw rows passed through a
    seeded shuffle buffer of `buffer_rows` rows (the order is computed from row numbers alone, so
    it is exact and cheap to replay). Rows are read a row group at a time as the order reaches
    them; a row read ahead waits at most about `buffer_rows` positions, so at most
    `buffer_rows` + one row group of encoded rows are held. `take(k)` returns the next k usable
    rows; a bad row is skipped (counted in the source) and the next one taken, so every caller
    that takes the same counts from the same state gets the same rows. `shuffle=False` is file
    order. `pos` counts raw positions of the epoch's order, usable or not.
    """

    def __init__(self, source: ParquetRows, seed: int, shuffle: bool = True, buffer_rows: int = 256,
                 epoch: int = 0, pos: int = 0) -> None:
        if source.num_rows == 0:
            raise ValueError(f"no rows to stream in {source.files} (skipped: {dict(source.skipped.counts)})")
        self.source, self.seed, self.shuffle, self.buffer_rows = source, seed, shuffle, max(1, buffer_rows)
        self.epoch, self.pos = epoch, pos
        self._start_epoch()

    def _start_epoch(self) -> None:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups = list(range(len(self.source.groups)))
        if self.shuffle:
            rng.shuffle(groups)
        self._group_order = groups
        sequence = [r for gi in groups for r in range(self.source.groups[gi].start,
                                                      self.source.groups[gi].start + self.source.groups[gi].rows)]
        if self.shuffle:
            order, buffer = [], []
            for r in sequence:
                if len(buffer) < self.buffer_rows:
                    buffer.append(r)
                    continue
                j = rng.randrange(self.buffer_rows)
                order.append(buffer[j])
                buffer[j] = r
            rng.shuffle(buffer)
            sequence = order + buffer
        self._order = sequence
        self._held: dict[int, tuple[dict[str, Any], _Group]] = {}
        self._next_group = 0  # index into _group_order of the next group to read
        self._done = set(sequence[:self.pos])  # a resumed epoch: rows already taken are not read again
        self._usable_this_epoch = 0

    def _record(self, raw: int) -> tuple[dict[str, Any], _Group]:
        while raw not in self._held:
            gi = self._group_order[self._next_group]
            self._next_group += 1
            g = self.source.groups[gi]
            if all(r in self._done for r in range(g.start, g.start + g.rows)):
                continue  # taken before the resume: not read at all
            for k, record in enumerate(self.source.read_group(gi)):
                if g.start + k not in self._done:
                    self._held[g.start + k] = (record, g)
        return self._held.pop(raw)

    def take(self, k: int) -> list[Row]:
        out: list[Row] = []
        while len(out) < k:
            if self.pos >= len(self._order):
                if self._usable_this_epoch == 0 and not self._done:
                    raise ValueError(f"no usable row in a whole epoch of {self.source.files} "
                                     f"(skipped: {dict(self.source.skipped.counts)})")
                self.epoch, self.pos = self.epoch + 1, 0
                self._start_epoch()
            raw = self._order[self.pos]
            self.pos += 1
            record, group = self._record(raw)
            row = self.source.parse(raw, record, group)
            if row is not None:
                self._usable_this_epoch += 1
                out.append(row)
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    @property
    def held_rows(self) -> int:
        """Encoded rows read ahead and not taken yet (bounded by about buffer_rows + a row group)."""
        return len(self._held)


def read_deepeyes(files: list[str], cfg: DataConfig) -> DataSet:
    """Read DeepEyes-schema parquet files into validated rows; bad rows are skipped and counted.

    All rows in memory (encoded): for inspection, SFT data and tests. Training streams the same
    rows through `ParquetRows` / `RowStream` instead. The Chart file (name holding `data_v0.8`, or
    rows with data_source `chart`) is skipped unless `cfg.include_chart`. Row ids are
    `extra_info.index` when present and unique, else `file:rownum`.

    Raises:
        FileNotFoundError: a listed file does not exist.
        ValueError: a file lacks a required column (the file is not DeepEyes-schema).
    """
    source = ParquetRows(files, cfg)
    ds = DataSet(files=source.files)
    ds.rows = list(source.iter_rows(progress=True))
    ds.skipped = source.skipped.counts
    log.info("read %s", ds.summary())
    return ds


# ---------------------------------------------------------------------------------------------
# synthetic data

DEFAULT_MIX = {"vstar": 0.75, "thinklite_eureka": 0.15, "chart": 0.10}
MAX_TARGET_PX_IN_FRAME = 5.5  # the target box's longest side in that frame, at most
TARGET_COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 230), "green": (20, 170, 40),
                  "yellow": (240, 220, 20), "orange": (245, 130, 20), "purple": (140, 40, 200)}
SIGN_COLOURS = {"yellow": (245, 225, 40), "orange": (250, 150, 40), "cyan": (60, 220, 235),
                "pink": (250, 150, 200)}
SHAPES = ("circle", "square", "triangle", "star")
STRIPES = ("horizontal", "vertical", "diagonal")
WORDS = ("LION", "BOAT", "KITE", "MOON", "FISH", "TREE", "STAR", "DOOR", "BIRD", "LAMP",
         "CAKE", "ROSE", "SHIP", "WOLF", "BELL", "RING", "CAT", "SUN", "OWL", "BUS")
DOT_NAMES = {1: "one", 2: "two", 3: "three"}
LETTERS = "ABCDEFGH"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
    ("ability", pa.string()),
    ("env_name", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([
        ("answer", pa.string()), ("question", pa.string()), ("index", pa.string()),
        ("split", pa.string()), ("kind", pa.string()), ("target_attribute", pa.string()),
        ("target_bbox", pa.list_(pa.int32())), ("options", pa.list_(pa.string())),
    ])),
])


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Fixed options (same pixels, same bytes); level 1: 3-4x faster than 6 on 16 MP charts, ~2x larger.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's embedded font: identical on every machine


def _clutter(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A muted background with many faint flat shapes: busy to the eye, cheap to draw and encode."""
    base = rng.integers(110, 190)
    tint = rng.integers(-10, 11, size=3)
    image = Image.new("RGB", (w, h), tuple(int(np.clip(base + t, 0, 255)) for t in tint))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(60, 140))):
        lum = int(base + rng.integers(-40, 41))
        colour = tuple(int(np.clip(lum + t, 0, 255)) for t in rng.integers(-12, 13, size=3))
        size = int(rng.integers(16, 400))
        x, y = int(rng.integers(-size // 2, w)), int(rng.integers(-size // 2, h))
        kind = rng.integers(0, 4)
        box = [x, y, x + size, y + int(size * rng.uniform(0.3, 1.5))]
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        elif kind == 2:
            draw.line(box, fill=colour, width=int(rng.integers(2, 12)))
        else:
            pts = [(x + int(rng.integers(0, size)), y + int(rng.integers(0, size))) for _ in range(3)]
            draw.polygon(pts, fill=colour)
    return image


def _shape_polygon(shape: str, x: int, y: int, s: int) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(x + s / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)]
    if shape == "star":
        cx, cy, r = x + (s - 1) / 2, y + (s - 1) / 2, (s - 1) / 2
        return [(cx + (r if k % 2 == 0 else 0.4 * r) * math.sin(k * math.pi / 5),
                 cy - (r if k % 2 == 0 else 0.4 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
    raise ValueError(shape)


def _stripe_tile(orientation: str, s: int) -> Image.Image:
    """Black/white stripes of period 4 px: far finer than the ~5-9x downscale to the model frame."""
    yy, xx = np.mgrid[0:s, 0:s]
    phase = {"horizontal": yy, "vertical": xx, "diagonal": xx + yy}[orientation]
    return Image.fromarray(np.where((phase // 2) % 2 == 0, 0, 255).astype(np.uint8), "L").convert("RGB")


def _scene_size(rng: np.random.Generator, target_side: int) -> tuple[int, int]:
    """A 1024-2048 px scene large enough that the target shrinks below MAX_TARGET_PX_IN_FRAME.

    The model frame scales both sides by about sqrt(max_pixels / (w*h)), so w*h must reach
    max_pixels * (side / MAX_TARGET_PX_IN_FRAME)^2; w and h are drawn so that it does.
    """
    need = DEFAULT_MAX_PIXELS * (target_side / MAX_TARGET_PX_IN_FRAME) ** 2  # the model frame
    if need > 2048 * 2048:
        raise ValueError(f"a {target_side}px target cannot vanish in a 2048x2048 scene")
    w = int(rng.integers(max(1024, math.ceil(need / 2048)), 2049))
    h = int(rng.integers(max(1024, math.ceil(need / w)), 2049))
    return w, h


def _ask(rng: np.random.Generator, question: str, answer: str, choices: tuple[str, ...],
         k: int) -> tuple[str, list[str]]:
    """Multiple choice (3 in 4 rows: options list includes the answer) or a one-word question."""
    if rng.random() < 0.75:
        others = [c for c in choices if c != answer]
        picked = [answer] + [str(c) for c in rng.choice(others, size=min(k, len(choices)) - 1, replace=False)]
        options = [picked[i] for i in rng.permutation(len(picked))]
        listing = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
        return f"{question}\nOptions: {listing}\nAnswer with the option's word.", options
    return f"{question} Answer with one word.", []


def _vstar(rng: np.random.Generator) -> dict[str, Any]:
    kind = str(rng.choice(["shape", "text", "stripes"]))
    if kind == "text":
        word = str(rng.choice(WORDS))
        font = _font(int(rng.integers(10, 13)))  # cap height 8-9 px: plain at native size
        l, t, r, b = font.getbbox(word)
        pad = 3
        tw, th = r - l + 2 * pad, b - t + 2 * pad
        side = max(tw, th)
    else:
        side = int(rng.integers(24, 45))
        tw = th = side
    w, h = _scene_size(rng, side)
    image = _clutter(rng, w, h)
    draw = ImageDraw.Draw(image)
    x, y = int(rng.integers(8, w - tw - 8)), int(rng.integers(8, h - th - 8))
    bbox = [x, y, x + tw, y + th]
    if kind == "shape":
        colour = str(rng.choice(list(TARGET_COLOURS)))
        answer = str(rng.choice(SHAPES))
        fill = TARGET_COLOURS[colour]
        if answer == "circle":
            draw.ellipse([x, y, x + side - 1, y + side - 1], fill=fill)
        elif answer == "square":
            draw.rectangle([x, y, x + side - 1, y + side - 1], fill=fill)
        else:
            draw.polygon(_shape_polygon(answer, x, y, side), fill=fill)
        question, options = _ask(rng, f"What shape is the small {colour} object?", answer, SHAPES, 4)
    elif kind == "text":
        colour = str(rng.choice(list(SIGN_COLOURS)))
        answer = word
        draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=SIGN_COLOURS[colour])
        draw.text((x + pad - l, y + pad - t), word, fill=(10, 10, 10), font=font)
        question, options = _ask(rng, f"What word is written on the small {colour} sign?", answer, WORDS, 4)
    else:
        colour = str(rng.choice(list(TARGET_COLOURS)))
        answer = str(rng.choice(STRIPES))
        frame = 3
        draw.rectangle([x, y, x + side - 1, y + side - 1], fill=TARGET_COLOURS[colour])
        image.paste(_stripe_tile(answer, side - 2 * frame), (x + frame, y + frame))
        question, options = _ask(rng, f"Which way do the stripes run inside the small {colour} frame?",
                                 answer, STRIPES, 3)
    return {"image": image, "question": question, "answer": answer, "options": options,
            "kind": kind, "attribute": {"shape": "shape", "text": "word", "stripes": "stripe orientation"}[kind],
            "bbox": bbox, "style": "model", "ability": "visual_search", "env": TOOL_ENV}


def _thinklite(rng: np.random.Generator) -> dict[str, Any]:
    w, h = (int(v) for v in rng.integers(8, 28, size=2))
    n = int(rng.integers(1, 4))
    bg = tuple(int(v) for v in rng.integers(170, 256, size=3))
    image = Image.new("RGB", (w, h), bg)
    cells = [(cx, cy) for cy in range(h // 3) for cx in range(w // 3)]  # 2x2 dot + 1 px gap per cell
    draw = ImageDraw.Draw(image)
    for c in rng.choice(len(cells), size=n, replace=False):
        cx, cy = cells[int(c)]
        draw.rectangle([3 * cx, 3 * cy, 3 * cx + 1, 3 * cy + 1], fill=(20, 20, 20))
    a, b = int(rng.integers(2, 10)), int(rng.integers(1, 20))
    question = (f"Let n be the number of dark dots in the image. What is {a} * n + {b}? "
                "Reason step by step and put the final number in \\boxed{}.")
    return {"image": image, "question": question, "answer": str(a * n + b), "options": [],
            "kind": "dots", "attribute": "dot count", "bbox": None, "style": "rule",
            "ability": "math", "env": ""}


def _chart(rng: np.random.Generator) -> dict[str, Any]:
    w, h = (int(v) for v in rng.integers(3000, 4097, size=2))
    image = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, bottom, top = w // 10, h - h // 10, h // 6
    draw.line([(left, top), (left, bottom), (w - w // 20, bottom)], fill=(0, 0, 0), width=6)
    names = [str(c) for c in rng.permutation(list(TARGET_COLOURS))[: int(rng.integers(4, 7))]]
    slot = (w - w // 20 - left) // len(names)
    font = _font(int(rng.integers(12, 17)))
    boxes = {}
    values = {}
    for i, name in enumerate(names):
        value = int(rng.integers(10, 100))
        x1 = left + i * slot + slot // 5
        x2 = x1 + slot * 3 // 5
        y1 = bottom - int((bottom - top) * value / 110)
        draw.rectangle([x1, y1, x2, bottom - 3], fill=TARGET_COLOURS[name])
        label = str(value)
        l, t, r, b = font.getbbox(label)
        lx, ly = (x1 + x2) // 2 - (r - l) // 2, y1 - 10 - (b - t)
        draw.text((lx - l, ly - t), label, fill=(0, 0, 0), font=font)
        boxes[name] = [lx - 2, ly - 2, lx + (r - l) + 2, ly + (b - t) + 2]
        values[name] = label
    pick = names[int(rng.integers(0, len(names)))]
    question = f"What value is printed above the {pick} bar? Answer with the number."
    return {"image": image, "question": question, "answer": values[pick], "options": [],
            "kind": "chart_value", "attribute": "bar value", "bbox": boxes[pick], "style": "model",
            "ability": "chart", "env": TOOL_ENV}


# The embedded demo's task (data.synthetic_task=zoom): what the stripes inside the red frame do.
ZOOM_ORIENTATIONS = ("horizontal", "vertical", "rising", "falling")
ZOOM_TARGET = "red"
ZOOM_DISTRACTORS = ("blue", "green")
ZOOM_DARK, ZOOM_LIGHT = 30, 226  # stripe levels: every orientation has the same mean (128)


def zoom_stripes(orientation: str, w: int, h: int, fade: int = 0) -> Image.Image:
    """Dark/light stripes of 2 px bands (period 4 px across for the axis-aligned ones, 4.2 px for
    the diagonals): the same mean for every orientation, and far finer than the model frame's
    pixel (6-8 native px), so the frame shows one flat grey whatever the orientation. The contrast
    ramps to zero over `fade` px at the edges: a band cut by the edge would otherwise tint the
    frame's edge pixels by orientation (measured: 15-22 levels without the ramp, 2 with it;
    bench/zoom_learnability.py)."""
    yy, xx = np.mgrid[0:h, 0:w]
    phase = {"horizontal": yy // 2, "vertical": xx // 2, "rising": (xx + yy) // 3,
             "falling": (xx - yy + 3 * h) // 3}[orientation]
    sign = np.where(phase % 2 == 0, -1.0, 1.0)
    edge = np.minimum(np.minimum(xx, w - 1 - xx), np.minimum(yy, h - 1 - yy)).astype(np.float64)
    envelope = np.clip((edge + 0.5) / fade, 0.0, 1.0) if fade > 0 else 1.0
    mid, half = (ZOOM_DARK + ZOOM_LIGHT) / 2, (ZOOM_LIGHT - ZOOM_DARK) / 2
    return Image.fromarray(np.round(mid + half * sign * envelope).astype(np.uint8), "L").convert("RGB")


# The cued task names the target's grid cell in the question (slot order: row by row), in compass
# words: "top", "left", "right" and "bottom" also stand in every prompt's tool schema ("the top-left
# corner"), so a tiny policy attending to them cannot tell the cue from the schema; each compass
# word is one token of the tiny vocabulary and appears nowhere else.
ZOOM_PLACES = ("northwest", "northeast", "southwest", "southeast")


def zoom_question(colour: str, options: list[str], place: str | None = None) -> str:
    """The zoom task's question; `place` (one of ZOOM_PLACES) names the frame's quarter."""
    listing = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    where = f" in the {place} quarter" if place else ""
    return (f"Which way do the stripes run inside the {colour} frame{where}?\nOptions: {listing}\n"
            "Answer with the option's word.")


ZOOM_SCENE = 1568     # native px: the model frame is exactly 224 x 224 (7 native px per frame px)
ZOOM_SIDE = (14.0, 20.0)  # frame px: the frames' outer side
ZOOM_SLOTS = 2        # frames sit in a ZOOM_SLOTS x ZOOM_SLOTS grid of slots (one frame per slot)


def _zoom_task(rng: np.random.Generator, cued: bool = True, target: str = ZOOM_TARGET) -> dict[str, Any]:
    """The embedded demo: a red-framed striped square and 1-2 other-colour frames (distractors)
    in a 1568 px scene, one frame per cell of a 2x2 grid, each nudged by up to 2 frame px. The
    frames are 14-20 px wide in the 224 px model frame; the stripes inside average to flat grey
    there, so which way they run is readable only in a crop cut from the original. Orientations,
    slots, nudges, sizes and distractor counts are uniform.

    `cued` (task `zoom`) names the red frame's quarter in the question: the words stand in for the
    grounding a real checkpoint brings from pre-training, which the tiny random model lacks (it
    never learned to find the frame by sight: the README's "The zoom demo"). The uncued
    variant (`zoom_find`) draws the same scene from the same stream, only the question differs."""
    w = h = ZOOM_SCENE
    scale = math.sqrt(w * h / DEFAULT_MAX_PIXELS)  # native px per model-frame px (7)
    image = _clutter(rng, w, h)
    draw = ImageDraw.Draw(image)
    others = ZOOM_DISTRACTORS if target == ZOOM_TARGET else tuple(c for c in TARGET_COLOURS if c != target)
    colours = [target] + [str(c) for c in rng.permutation(others)[: int(rng.integers(1, 3))]]
    slots = rng.permutation(ZOOM_SLOTS * ZOOM_SLOTS)[: len(colours)]
    answer = str(rng.choice(ZOOM_ORIENTATIONS))
    boxes = []
    cell = w / ZOOM_SLOTS
    for colour, slot in zip(colours, slots):
        side = int(rng.uniform(*ZOOM_SIDE) * scale)
        ring = max(3, int(2.5 * scale))
        cx = (int(slot) % ZOOM_SLOTS + 0.5) * cell + rng.uniform(-2, 2) * scale
        cy = (int(slot) // ZOOM_SLOTS + 0.5) * cell + rng.uniform(-2, 2) * scale
        x, y = int(cx - side / 2), int(cy - side / 2)
        orientation = answer if colour == target else str(rng.choice(ZOOM_ORIENTATIONS))
        draw.rectangle([x, y, x + side - 1, y + side - 1], fill=TARGET_COLOURS[colour])
        inner = side - 2 * ring
        image.paste(zoom_stripes(orientation, inner, inner, fade=round(2 * scale)), (x + ring, y + ring))
        boxes.append([x, y, x + side, y + side])
    options = [str(o) for o in rng.permutation(ZOOM_ORIENTATIONS)]
    question = zoom_question(target, options, ZOOM_PLACES[int(slots[0])] if cued else None)
    return {"image": image, "question": question, "answer": answer, "options": options,
            "kind": "zoom_stripes", "attribute": "stripe orientation", "bbox": boxes[0], "style": "model",
            "ability": "visual_search", "env": TOOL_ENV}


_MAKERS = {"vstar": _vstar, "thinklite_eureka": _thinklite, "chart": _chart, "zoom": _zoom_task,
           "zoom_find": lambda rng: _zoom_task(rng, cued=False)}
ZOOM_TASKS = ("zoom", "zoom_find")  # data.synthetic_task values that write one file of that maker


def mix_counts(rows: int, mix: dict[str, float]) -> dict[str, int]:
    """Split `rows` by `mix` with the largest-remainder rule (the counts sum to `rows`)."""
    unknown = set(mix) - set(_MAKERS)
    if unknown or not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix {mix!r}: keys must be among {list(_MAKERS)}, weights >= 0, sum > 0")
    total = sum(mix.values())
    exact = {k: rows * v / total for k, v in mix.items()}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], list(mix).index(k)))[: rows - sum(counts.values())]:
        counts[k] += 1
    return counts


def write_synthetic(path: str, rows: int, seed: int, mix: dict[str, float] | None = None,
                    split: str = "train") -> str:
    """Write `rows` synthetic DeepEyes-schema rows to `path` (parquet); returns `path`.

    Deterministic: the same (rows, seed, mix, split) give the same bytes. Row i draws from its own
    stream seeded by (seed, split, i), so different splits or seeds give disjoint rows.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split {split!r}: use one of {list(SPLIT_CODES)}")
    counts = mix_counts(rows, dict(mix or DEFAULT_MIX))
    kinds = [k for k, n in counts.items() for _ in range(n)]
    order = np.random.default_rng([seed, SPLIT_CODES[split], 999_983]).permutation(len(kinds))
    records: dict[str, list[Any]] = {name: [] for name in _SCHEMA.names}
    for i, j in enumerate(order):
        source = kinds[int(j)]
        rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
        made = _MAKERS[source](rng)
        index = f"synth-{split}-{seed}-{source}-{i}"
        records["data_source"].append(source)
        records["prompt"].append([{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": f"{IMAGE_MARKER}\n{made['question']}"}])
        records["images"].append([{"bytes": _png(made["image"]), "path": f"{index}.png"}])
        records["ability"].append(made["ability"])
        records["env_name"].append(made["env"])
        records["reward_model"].append({"ground_truth": made["answer"], "style": made["style"]})
        records["extra_info"].append({
            "answer": made["answer"], "question": made["question"], "index": index, "split": split,
            "kind": made["kind"], "target_attribute": made["attribute"], "target_bbox": made["bbox"],
            "options": made["options"]})
    table = pa.Table.from_pydict(records, schema=_SCHEMA)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Fixed writer options (no timestamps are written by parquet-cpp): same table, same bytes.
    pq.write_table(table, path, row_group_size=16, compression="snappy", version="2.6",
                   data_page_version="1.0", use_dictionary=True, write_statistics=True)
    return path


def write_synthetic_suite(out_dir: str, rows: int, seed: int, split: str = "train") -> list[str]:
    """Write the three files of the real dataset's layout (V*, ThinkLite, Chart) under `out_dir`.

    `rows` are split by DEFAULT_MIX. Returns the paths in that order; the Chart file is excluded
    by read_deepeyes unless data.include_chart.
    """
    counts = mix_counts(rows, DEFAULT_MIX)
    names = {"vstar": VSTAR_FILE, "thinklite_eureka": THINKLITE_FILE, "chart": CHART_FILE}
    # Each file gets its own seed stream (seed*3+k) so rows do not repeat across the three files.
    return [write_synthetic(os.path.join(out_dir, names[k]), counts[k], seed * 3 + n, {k: 1.0}, split)
            for n, k in enumerate(("vstar", "thinklite_eureka", "chart"))]


# ---------------------------------------------------------------------------------------------
# CLI


def _inspect(files: list[str], cfg: DataConfig) -> str:
    ds = read_deepeyes(files, cfg)
    lines = [f"files: {len(files)}", f"rows kept: {len(ds)}"]
    for source, n in sorted(collections.Counter(r.data_source for r in ds).items()):
        lines.append(f"  {source}: {n}")
    for column in ("ability", "env_name"):  # env_name visual_toolbox_v2 marks the tool rows
        counts = collections.Counter(getattr(r, column) or "(empty)" for r in ds)
        lines.append(f"{column}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    lines.append(f"rows skipped: {sum(ds.skipped.values())}")
    for reason, n in sorted(ds.skipped.items()):
        lines.append(f"  {reason}: {n}  ({SKIP_REASONS[reason]})")
    sizes = np.array([s for r in ds for s in r.image_sizes], dtype=np.int64).reshape(-1, 2)
    if len(sizes):
        lines.append(f"images: {len(sizes)}")
        for name, col in (("width", sizes[:, 0]), ("height", sizes[:, 1]), ("pixels", sizes.prod(1))):
            lines.append(f"  {name}: min {col.min()}  median {int(np.median(col))}  max {col.max()}")
        lines.append(f"  short side < {cfg.min_image_side} (upscaled on decode): "
                     f"{int((sizes.min(1) < cfg.min_image_side).sum())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m deepeyes.data",
                                 description="Synthetic DeepEyes-schema data and a checker for parquet files.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the three-file synthetic suite (V*, ThinkLite, Chart) to DIR",
                       description="Write data_0.1.2_visual_toolbox_v2.parquet, data_thinklite_reasoning_acc"
                                   ".parquet and data_v0.8_visual_toolbox_v2.parquet (rows split 75/15/10).")
    s.add_argument("--out", required=True, help="output folder (created)")
    s.add_argument("--rows", type=int, default=64, help="rows over the three files (default 64)")
    s.add_argument("--seed", type=int, default=1234, help="generator seed; same seed, same bytes (default 1234)")
    s.add_argument("--split", choices=list(SPLIT_CODES), default="train",
                   help="split name; different splits give disjoint rows (default train)")
    i = sub.add_parser("inspect", help="read parquet files as training would; print counts, skips, image sizes")
    i.add_argument("files", nargs="+", help="DeepEyes-schema parquet files")
    i.add_argument("--include-chart", action="store_true", help="keep Chart rows (data.include_chart)")
    i.add_argument("--max-image-pixels", type=int, default=DataConfig().max_image_pixels,
                   help="pixel cap per image, from the header (data.max_image_pixels)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "synth":
        import time

        t0 = time.perf_counter()
        paths = write_synthetic_suite(args.out, args.rows, args.seed, args.split)
        for p in paths:
            print(f"{p}  {pq.ParquetFile(p).metadata.num_rows} rows  {os.path.getsize(p) / 1e6:.2f} MB")
        print(f"{args.rows} rows in {time.perf_counter() - t0:.1f} s")
    else:
        cfg = dataclasses.replace(DataConfig(), include_chart=args.include_chart,
                                  max_image_pixels=args.max_image_pixels)
        print(_inspect(args.files, cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
