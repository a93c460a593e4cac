"""The data pipeline: synthetic suite round trip, determinism, upscaling, Chart opt-in, bad rows.

Golden values here are worked out by hand (mix counts, upscaled sizes, skip counts per crafted
row) or measured with definitions written in this file (shape fill ratios, luminance), never read
back from the generator.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from deepeyes import data
from deepeyes.chat import SYSTEM_PROMPT
from deepeyes.config import DataConfig
from deepeyes.policy import resize_for_model, smart_resize_hw

MIN_PIXELS, MAX_PIXELS = 3136, 50176  # the model frame of the recipe (model.min/max_pixels)


def _lum(a: np.ndarray) -> np.ndarray:
    return a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> list[str]:
    # 20 rows by 75/15/10 -> 15 V*, 3 ThinkLite, 2 Chart (exact, no rounding needed).
    return data.write_synthetic_suite(str(tmp_path_factory.mktemp("suite")), rows=20, seed=7)


@pytest.fixture(scope="module")
def vstar_rows(tmp_path_factory) -> list[data.Row]:
    path = data.write_synthetic(str(tmp_path_factory.mktemp("v") / "v.parquet"), 24, seed=5,
                                mix={"vstar": 1.0})
    return data.read_deepeyes([path], DataConfig()).rows


# ---------------------------------------------------------------------------------------------
# round trip


def test_suite_files_are_named_like_the_real_ones(suite):
    assert [p.rsplit("/", 1)[1] for p in suite] == [
        "data_0.1.2_visual_toolbox_v2.parquet", "data_thinklite_reasoning_acc.parquet",
        "data_v0.8_visual_toolbox_v2.parquet"]
    assert [pq.ParquetFile(p).metadata.num_rows for p in suite] == [15, 3, 2]
    names = set(pq.ParquetFile(suite[0]).schema_arrow.names)
    assert names == {"data_source", "prompt", "images", "ability", "env_name", "reward_model", "extra_info"}


def test_round_trip_every_row_valid(suite):
    ds = data.read_deepeyes(suite, DataConfig(include_chart=True))
    assert len(ds) == 20 and sum(ds.skipped.values()) == 0
    assert collections.Counter(r.data_source for r in ds) == {"vstar": 15, "thinklite_eureka": 3, "chart": 2}
    assert len({r.index for r in ds}) == 20
    for row in ds:
        assert row.messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert [m["role"] for m in row.messages] == ["system", "user"]
        # The stored user text was "<image>\n" + question: one image part, then the question.
        assert row.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": row.question}]
        assert "<image>" not in row.question and row.question
        assert row.ground_truth == row.extra["answer"] != ""
        (image,) = row.images
        assert image.mode == "RGB"
        w, h = row.image_sizes[0]
        if min(w, h) >= 28:
            assert image.size == (w, h)  # not resized by the reader; the rollout does that
        if row.extra["options"]:
            assert row.ground_truth in row.extra["options"]
            for letter, option in zip("ABCD", row.extra["options"]):
                assert f"({letter}) {option}" in row.question
        if row.data_source == "thinklite_eureka":
            assert row.ground_truth.isdigit() and row.extra["target_bbox"] is None
            continue
        x1, y1, x2, y2 = row.extra["target_bbox"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert max(x2 - x1, y2 - y1) <= 64  # the target really is small ...
        assert (x2 - x1) * (y2 - y1) < 1e-3 * w * h  # ... against the whole image
        assert row.env_name == "visual_toolbox_v2"


def test_image_sizes_per_source(suite):
    ds = data.read_deepeyes(suite, DataConfig(include_chart=True))
    for row in ds:
        w, h = row.image_sizes[0]
        lo, hi = {"vstar": (1024, 2048), "thinklite_eureka": (8, 27), "chart": (3000, 4096)}[row.data_source]
        assert lo <= w <= hi and lo <= h <= hi, (row.data_source, w, h)
    chart_bytes = [len(r.image_bytes[0]) for r in ds if r.data_source == "chart"]
    assert max(chart_bytes) < 1_000_000  # a 16 MP chart stays a modest PNG (flat colours)


# ---------------------------------------------------------------------------------------------
# determinism and splits


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    mix = {"vstar": 2, "thinklite_eureka": 1, "chart": 1}
    a = data.write_synthetic(str(tmp_path / "a.parquet"), 4, seed=3, mix=mix)
    b = data.write_synthetic(str(tmp_path / "b.parquet"), 4, seed=3, mix=mix)
    c = data.write_synthetic(str(tmp_path / "c.parquet"), 4, seed=4, mix=mix)
    raw = [open(p, "rb").read() for p in (a, b, c)]
    assert raw[0] == raw[1]
    assert raw[0] != raw[2]


def test_train_and_val_are_disjoint(tmp_path):
    # 6 rows -> 4.5 / 0.9 / 0.6: floors 4/0/0, the two left over by remainder: thinklite (0.9),
    # chart (0.6) -> 4/1/1. 4 rows -> 3 / 0.6 / 0.4 -> 3/1/0.
    train = data.write_synthetic_suite(str(tmp_path / "train"), 6, seed=1, split="train")
    val = data.write_synthetic_suite(str(tmp_path / "val"), 4, seed=1, split="val")
    cfg = DataConfig(include_chart=True)
    tr, va = data.read_deepeyes(train, cfg), data.read_deepeyes(val, cfg)
    assert collections.Counter(r.data_source for r in tr) == {"vstar": 4, "thinklite_eureka": 1, "chart": 1}
    assert collections.Counter(r.data_source for r in va) == {"vstar": 3, "thinklite_eureka": 1}
    assert not {r.index for r in tr} & {r.index for r in va}
    assert not {r.image_bytes[0] for r in tr} & {r.image_bytes[0] for r in va}
    assert {r.extra["split"] for r in tr} == {"train"} and {r.extra["split"] for r in va} == {"val"}


def test_mix_counts_by_largest_remainder(tmp_path):
    # 10 rows at 75/15/10: exact 7.5 / 1.5 / 1.0 -> floors 7/1/1, the two 0.5 remainders tie and the
    # one left over goes to the first listed (vstar): 8/1/1.
    assert data.mix_counts(10, data.DEFAULT_MIX) == {"vstar": 8, "thinklite_eureka": 1, "chart": 1}
    assert data.mix_counts(3, {"vstar": 1, "chart": 2}) == {"vstar": 1, "chart": 2}
    assert data.mix_counts(0, data.DEFAULT_MIX) == {"vstar": 0, "thinklite_eureka": 0, "chart": 0}
    with pytest.raises(ValueError, match="mix"):
        data.write_synthetic(str(tmp_path / "x.parquet"), 4, seed=0, mix={"coco": 1.0})


# ---------------------------------------------------------------------------------------------
# the target is unreadable in the model frame and plain in a native crop


def _frame_scale(w: int, h: int) -> tuple[float, float]:
    fh, fw = smart_resize_hw(h, w, MIN_PIXELS, MAX_PIXELS)
    return fw / w, fh / h


def test_vstar_target_shrinks_below_6px_in_model_frame(vstar_rows):
    assert len(vstar_rows) == 24
    assert {r.extra["kind"] for r in vstar_rows} == {"shape", "text", "stripes"}
    for row in vstar_rows:
        sx, sy = _frame_scale(*row.image_sizes[0])
        x1, y1, x2, y2 = row.extra["target_bbox"]
        assert (x2 - x1) * sx < 6 and (y2 - y1) * sy < 6, row.index
        assert min(x2 - x1, y2 - y1) >= 12  # while at native size it spans many pixels


def test_stripes_average_out_in_frame_but_alternate_in_crop(vstar_rows):
    rows = [r for r in vstar_rows if r.extra["kind"] == "stripes"]
    assert rows
    for row in rows:
        image = row.images[0]
        x1, y1, x2, y2 = (int(v) for v in row.extra["target_bbox"])
        inner = (x1 + 3, y1 + 3, x2 - 3, y2 - 3)  # inside the 3-px coloured frame
        native = _lum(np.asarray(image.crop(inner)))
        # Native: half the pixels black, half white (2-px stripes).
        assert (native < 30).mean() > 0.4 and (native > 225).mean() > 0.4
        frame = resize_for_model(image, MIN_PIXELS, MAX_PIXELS)
        sx, sy = frame.width / image.width, frame.height / image.height
        box = (int(np.ceil(inner[0] * sx)), int(np.ceil(inner[1] * sy)),
               int(np.floor(inner[2] * sx)), int(np.floor(inner[3] * sy)))
        seen = _lum(np.asarray(frame.crop(box)))
        assert seen.size >= 1
        # Frame: the stripes blur into one grey; no black or white pixel survives.
        assert seen.max() - seen.min() < 40 and 80 < seen.mean() < 180, (row.index, seen)


def test_sign_text_strokes_vanish_in_frame(vstar_rows):
    rows = [r for r in vstar_rows if r.extra["kind"] == "text"]
    assert rows
    for row in rows:
        image = row.images[0]
        box = tuple(int(v) for v in row.extra["target_bbox"])
        native = _lum(np.asarray(image.crop(box)))
        assert (native < 60).sum() >= 15  # dark glyph strokes on a light sign
        frame = resize_for_model(image, MIN_PIXELS, MAX_PIXELS)
        sx, sy = frame.width / image.width, frame.height / image.height
        fbox = (int(box[0] * sx), int(box[1] * sy), int(np.ceil(box[2] * sx)), int(np.ceil(box[3] * sy)))
        assert _lum(np.asarray(frame.crop(fbox))).min() > 80  # no stroke pixel left


# Fill ratio of an s x s box, worked out by hand: square 1, circle pi/4 = 0.785, triangle 1/2,
# 5-point star with inner radius 0.4 R: area 5 R r sin 36deg = 1.176 R^2 over (2R)^2 -> 0.294.
FILL = {"square": 1.0, "circle": 0.785, "triangle": 0.5, "star": 0.294}


def test_shape_is_readable_from_native_crop(vstar_rows):
    rows = [r for r in vstar_rows if r.extra["kind"] == "shape"]
    assert rows
    for row in rows:
        colour = row.question.split("small ")[1].split(" ")[0]
        rgb = np.array(data.TARGET_COLOURS[colour], dtype=np.float64)
        crop = np.asarray(row.images[0].crop(tuple(int(v) for v in row.extra["target_bbox"])))
        mask = np.linalg.norm(crop.astype(np.float64) - rgb, axis=-1) < 40
        fill = mask.mean()
        guess = min(FILL, key=lambda s: abs(FILL[s] - fill))
        assert guess == row.ground_truth, (row.index, fill)
        assert abs(FILL[guess] - fill) < 0.1  # a clear margin: neighbouring ratios differ by >= 0.2


# ---------------------------------------------------------------------------------------------
# hand-built rows: upscaling and every skip reason


def _png(w: int, h: int, colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h but carries almost no pixel data (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _record(images: list[bytes | None], truth: str | None = "7", text: str = "<image>\nHow many?",
            source: str = "thinklite_eureka", index: str | None = None, bbox: list[int] | None = None,
            prompt: list[dict] | None = None) -> dict:
    return {
        "data_source": source,
        "prompt": prompt if prompt is not None else [
            {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text}],
        "images": [{"bytes": b, "path": None} for b in images],
        "reward_model": {"ground_truth": truth, "style": "rule"},
        "extra_info": {"answer": truth, "question": None, "index": index, "split": "train", "target_bbox": bbox},
        "ability": "math",
        "env_name": "",
    }


def _write(path, records: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(records), str(path))
    return str(path)


def test_tiny_images_upscaled_aspect_kept(tmp_path):
    # Hand: short side -> 28, long side * 28 / short, rounded half up.
    cases = {(10, 20): (28, 56), (8, 27): (28, 95),  # 27 * 3.5 = 94.5 -> 95
             (27, 8): (95, 28), (28, 5): (157, 28),  # 28 * 5.6 = 156.8 -> 157
             (40, 30): (40, 30), (28, 28): (28, 28)}
    path = _write(tmp_path / "tiny.parquet", [_record([_png(w, h)]) for w, h in cases])
    ds = data.read_deepeyes([path], DataConfig())
    assert [r.images[0].size for r in ds] == list(cases.values())
    assert [r.image_sizes[0] for r in ds] == list(cases)  # the stored size is kept as well
    big = data.read_deepeyes([path], dataclasses.replace(DataConfig(), min_image_side=56))
    assert big[0].images[0].size == (56, 112)


def test_chart_file_excluded_by_default(suite):
    default = data.read_deepeyes(suite, DataConfig())
    assert len(default) == 18 and "chart" not in {r.data_source for r in default}
    assert default.skipped == {"chart_excluded": 2}
    opted = data.read_deepeyes(suite, DataConfig(include_chart=True))
    assert collections.Counter(r.data_source for r in opted)["chart"] == 2


def test_chart_rows_excluded_in_any_file(tmp_path):
    path = data.write_synthetic(str(tmp_path / "mixed.parquet"), 2, seed=2, mix={"chart": 1.0})
    default = data.read_deepeyes([path], DataConfig())
    assert len(default) == 0 and default.skipped == {"chart_excluded": 2}
    assert len(data.read_deepeyes([path], DataConfig(include_chart=True))) == 2


def test_broken_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    good = _png(40, 30)
    truncated = good[: len(good) // 2]
    records = [
        _record([good], index="good-1"),
        _record([None]),                                          # missing_image (no bytes)
        _record([], text="How many?"),                            # missing_image (no images)
        _record([b"this is not an image"]),                       # undecodable_image
        _record([truncated]),                                     # undecodable_image
        _record([good], truth=None),                              # missing_ground_truth
        _record([good], truth="  "),                              # missing_ground_truth
        _record([_png_header(100_000, 100_000)]),                 # image_too_many_pixels (PIL's limit)
        _record([_png_header(9000, 9000)]),                       # image_too_many_pixels (our cap)
        _record([good], text="<image><image>\nCompare."),         # image_count_mismatch
        _record([good, good], text="<image>\nOnly one marker."),  # image_count_mismatch
        _record([_png(600, 2)]),                                  # extreme_aspect_ratio (300)
        _record([good], bbox=[10, 10, 50, 20]),                   # bad_target_bbox (x2 > 40)
        _record([good], prompt=[{"role": "system", "content": "hi"}]),  # malformed_prompt
        _record([good], source="chart"),                          # chart_excluded
        _record([good], index="good-2", bbox=[1, 2, 30, 25]),
    ]
    path = _write(tmp_path / "broken.parquet", records)
    with caplog.at_level(logging.WARNING, logger="deepeyes.data"):
        ds = data.read_deepeyes([path], DataConfig())
    assert ds.skipped == {"missing_image": 2, "undecodable_image": 2, "missing_ground_truth": 2,
                          "image_too_many_pixels": 2, "image_count_mismatch": 2,
                          "extreme_aspect_ratio": 1, "bad_target_bbox": 1, "malformed_prompt": 1,
                          "chart_excluded": 1}
    assert [r.index for r in ds] == ["good-1", "good-2"]
    assert ds[1].extra["target_bbox"] == [1, 2, 30, 25]
    assert ds[0].images[0].getpixel((0, 0)) == (200, 10, 10)
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warned) == 9  # once per reason, not once per row
    for reason in ds.skipped:
        assert sum(reason in w for w in warned) == 1
    assert "data.max_image_pixels" in next(w for w in warned if "image_too_many_pixels" in w)


def test_byte_cap_and_missing_index_fallback(tmp_path):
    path = _write(tmp_path / "b.parquet", [_record([_png(40, 30)]), _record([_png(400, 300, (1, 2, 3))])])
    small = len(_png(40, 30))
    ds = data.read_deepeyes([path], dataclasses.replace(DataConfig(), max_image_bytes=small))
    # The flat 400x300 PNG is larger than the flat 40x30 one.
    assert ds.skipped == {"image_too_many_bytes": 1}
    assert [r.index for r in ds] == ["b.parquet:0"]


def test_repeated_index_across_files_stays_unique(tmp_path):
    a = _write(tmp_path / "a.parquet", [_record([_png(40, 30)], index="0")])
    b = _write(tmp_path / "b.parquet", [_record([_png(40, 30)], index="0")])
    ds = data.read_deepeyes([a, b], DataConfig())
    assert [r.index for r in ds] == ["0", "b.parquet:0"]


def test_pixel_cap_checked_before_decoding(tmp_path, monkeypatch):
    # Spy on PIL's decoder entry point (ImageFile.load): the bomb rows must never reach it.
    path = _write(tmp_path / "bomb.parquet", [_record([_png_header(100_000, 100_000)]),
                                              _record([_png_header(9000, 9000)])])
    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    # The reader raises PIL's own limit to a larger configured cap; restore it after this test.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    ds = data.read_deepeyes([path], DataConfig())
    assert ds.skipped == {"image_too_many_pixels": 2} and loads == []
    # With a cap above 81 MP the 9000x9000 header passes the cap, reaches the decoder and fails
    # there (its pixel data is missing): the spy sees exactly that one load.
    ds = data.read_deepeyes([path], dataclasses.replace(DataConfig(), max_image_pixels=90_000_000))
    assert ds.skipped == {"image_too_many_pixels": 1, "undecodable_image": 1}
    assert loads == [(9000, 9000)]


def test_user_errors_name_the_cause(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train_files"):
        data.read_deepeyes([str(tmp_path / "nope.parquet")], DataConfig())
    path = _write(tmp_path / "wrong.parquet", [{"question": "x", "answer": "y"}])
    with pytest.raises(ValueError, match="not a DeepEyes-schema parquet"):
        data.read_deepeyes([path], DataConfig())


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_synth_and_inspect(tmp_path, capsys):
    data.main(["synth", "--out", str(tmp_path), "--rows", "8", "--seed", "2"])
    out = capsys.readouterr().out
    assert "8 rows in" in out
    data.main(["inspect", *sorted(str(p) for p in tmp_path.glob("*.parquet"))])
    out = capsys.readouterr().out
    # 8 rows at 75/15/10: 6 / 1.2 / 0.8 -> floors 6/1/0, one left over to chart (remainder 0.8).
    assert "rows kept: 7" in out and "chart_excluded: 1" in out and "vstar: 6" in out
    assert "short side < 28 (upscaled on decode): 1" in out
    assert "ability: math 1, visual_search 6" in out and "env_name: (empty) 1, visual_toolbox_v2 6" in out
    with pytest.raises(SystemExit):
        data.main(["--help"])
    assert "synth" in capsys.readouterr().out


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _transparent_images() -> dict[str, Image.Image]:
    rgba = Image.new("RGBA", (30, 30), (0, 0, 0, 0))  # transparent, stored black
    rgba.putpixel((1, 0), (0, 0, 0, 128))             # half transparent black
    rgba.putpixel((2, 0), (200, 10, 10, 255))         # opaque red
    la = Image.new("LA", (30, 30), (0, 0))
    pal = Image.new("P", (30, 30), 0)
    pal.putpalette([0, 0, 0, 200, 10, 10])
    pal.info["transparency"] = 0                      # palette entry 0 (black) is transparent
    return {"RGBA": rgba, "LA": la, "P": pal}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_decode_white_like_the_qwen_reference(mode):
    """Issue 12 item 13: a transparent pixel stored black used to decode black; Qwen's own
    conversion (qwen_vl_utils.to_rgb) composites over white, so the project does too."""
    from deepeyes.images import decode_image

    image = decode_image(_png_bytes(_transparent_images()[mode]), max_pixels=10_000)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    if mode == "RGBA":  # 0 * a + 255 * (1 - a) with a = 128/255; opaque pixels keep their colour
        assert image.getpixel((1, 0)) == (127, 127, 127) and image.getpixel((2, 0)) == (200, 10, 10)


def test_to_rgb_keeps_rgb_and_grey_images_as_they_are():
    from deepeyes.images import to_rgb

    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(rgb) is rgb
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)
