"""The embedded demo's task (data.synthetic_task=zoom) and what training needs for it: stripes that
vanish in the model frame and show in a crop of the original, crops cut from the original in
training (tools.crop_from), cold-start boxes on a grid and answers that do not solve the task."""

from __future__ import annotations

import collections
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyes.config import load_config
from deepeyes.data import (TARGET_COLOURS, ZOOM_ORIENTATIONS, ZOOM_PLACES, ZOOM_TARGET, read_deepeyes,
                           write_synthetic, zoom_stripes)
from deepeyes.policy import oriented_filter_bank, resize_for_model
from trainer.rollouts import episode_requests
from trainer.sft import frame_box, sft_answer, tool_conversation

ORIENTATIONS = ZOOM_ORIENTATIONS


@pytest.fixture(scope="module")
def zoom_rows(tmp_path_factory):
    cfg = load_config(overrides=["data.synthetic_task=zoom"])
    path = write_synthetic(str(tmp_path_factory.mktemp("zoom") / "z.parquet"), 48, 3, mix={"zoom": 1.0})
    return read_deepeyes([path], cfg.data).rows


def _scene(orientation: str, fade: int) -> Image.Image:
    scene = Image.new("RGB", (1568, 1568), (150, 150, 150))
    scene.paste(zoom_stripes(orientation, 140, 140, fade), (701, 533))
    return scene


def test_the_orientation_vanishes_in_the_model_frame_and_shows_in_the_crop():
    frames = [np.asarray(resize_for_model(_scene(o, 14), 3136, 50176)).astype(int) for o in ORIENTATIONS]
    crops = [np.asarray(_scene(o, 14).crop((701, 533, 841, 673))).astype(int) for o in ORIENTATIONS]
    # every orientation has the same mean, and the bands (2 px) are finer than a frame pixel (7 px)
    assert max(int(np.abs(a - b).max()) for a in frames for b in frames) <= 3
    assert min(int(np.abs(a - b).max()) for i, a in enumerate(crops) for b in crops[i + 1:]) >= 150
    # without the contrast ramp, a band cut by the edge tints the frame's edge pixels
    raw = [np.asarray(resize_for_model(_scene(o, 0), 3136, 50176)).astype(int) for o in ORIENTATIONS]
    assert max(int(np.abs(a - b).max()) for a in raw for b in raw) >= 10
    # and the stripes keep one mean whatever their orientation
    means = [float(np.asarray(zoom_stripes(o, 140, 140, 14)).mean()) for o in ORIENTATIONS]
    assert max(means) - min(means) < 0.5


def test_zoom_rows_are_well_formed_and_balanced(zoom_rows):
    counts = collections.Counter(r.ground_truth for r in zoom_rows)
    assert set(counts) == set(ORIENTATIONS) and min(counts.values()) >= 6  # 48 rows, uniform answers
    for r in zoom_rows:
        assert sorted(r.extra["options"]) == sorted(ORIENTATIONS) and r.ground_truth in r.extra["options"]
        assert f"inside the {ZOOM_TARGET} frame" in r.question and r.ground_truth not in r.question.split("?")[0]
        x1, y1, x2, y2 = (int(v) for v in r.extra["target_bbox"])
        image = np.asarray(r.images[0])
        assert image.shape[:2] == (1568, 1568)
        assert tuple(int(v) for v in image[y1 + 2, (x1 + x2) // 2]) == TARGET_COLOURS[ZOOM_TARGET]  # the red ring
    # the target's cell of the 2x2 grid is uniform too (nothing about the layout gives it away)
    cells = collections.Counter((r.extra["target_bbox"][0] > 784, r.extra["target_bbox"][1] > 784) for r in zoom_rows)
    assert len(cells) == 4 and min(cells.values()) >= 2  # 48 draws of 4 cells: this seed gives 4-18


def test_training_crops_come_from_the_original_with_crop_from_original(zoom_rows):
    """The same cold-start conversation: the crop shows the stripes only when cut from the original."""
    row = zoom_rows[0]
    spread = {}
    for source in ("frame", "original"):
        cfg = load_config(overrides=[f"tools.crop_from={source}", "trainer.sft_box_grid=8"])
        messages, images = tool_conversation(row, cfg, "vertical")
        assert len(images) == 2 and messages[-1]["content"].endswith("<answer>vertical</answer>")
        crop = np.asarray(images[1]).astype(float)
        h, w = crop.shape[:2]
        centre = crop[h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4]
        spread[source] = float(centre.std())
    assert spread["original"] > 40 > 10 > spread["frame"]


def test_episode_requests_carry_the_original_only_with_crop_from_original(zoom_rows):
    for source, expect in (("frame", False), ("original", True)):
        cfg = load_config(overrides=[f"tools.crop_from={source}"])
        reqs = episode_requests(cfg, zoom_rows, [0, 1], step=1, version=0, n=2)
        assert len(reqs) == 4
        assert all((r.crop_source is not None) == expect for r in reqs)
        if expect:  # the encoded original, shared by the n samples of a prompt
            assert reqs[0].crop_source is reqs[1].crop_source == zoom_rows[0].image_bytes[0]


def test_grid_boxes_hold_the_target_and_take_few_values(zoom_rows):
    xs = set()
    for r in zoom_rows:
        box = frame_box(r.extra["target_bbox"], r.image_sizes[0], (224, 224), grid=8, min_side=32)
        t = [v * 224 / 1568 for v in r.extra["target_bbox"]]
        assert box[0] <= t[0] and box[1] <= t[1] and box[2] >= t[2] and box[3] >= t[3]
        assert all(v % 8 == 0 for v in box) and box[2] - box[0] >= 32
        xs.add(box[0])
    assert len(xs) <= 4  # one left edge per grid column (the nudges snap away), a box the policy can write
    # grid 0: the plain rule, the target grown by a quarter of its size on each side
    assert frame_box([100, 100, 140, 120], (200, 200), (200, 200)) == [90, 95, 150, 125]


def test_cold_start_answers_are_uniform_options_or_the_truth(zoom_rows):
    pick = random.Random(0)
    row = zoom_rows[0]
    drawn = collections.Counter(sft_answer(row, "random", pick) for _ in range(800))
    assert set(drawn) == set(ORIENTATIONS) and min(drawn.values()) > 150
    assert sft_answer(row, "truth", pick) == row.ground_truth


def test_oriented_filter_bank_prefers_its_own_orientation():
    torch.manual_seed(0)
    w = torch.randn(64, 3, 2, 14, 14) * 0.02
    mean_norm = float(w.flatten(1).norm(dim=1).mean())
    k = oriented_filter_bank(w, periods=(4.0,), orientations=4, gain=4.0)
    assert k == 8 and torch.allclose(w[:8].flatten(1).norm(dim=1), torch.full((8,), 4 * mean_norm), rtol=1e-4)
    yy, xx = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    for o in range(4):  # gratings at the bank's period: the energy of filter pair o peaks at orientation o
        energies = []
        for q in range(4):
            th = math.pi * q / 4
            u = (xx - 6.5) * math.cos(th) + (yy - 6.5) * math.sin(th)
            e = 0.0
            for phase in np.linspace(0, 2 * math.pi, 8, endpoint=False):
                x = torch.cos(2 * math.pi * u / 4.0 + float(phase)).expand(3, 2, 14, 14)
                e += float((w[2 * o] * x).sum()) ** 2 + float((w[2 * o + 1] * x).sum()) ** 2
            energies.append(e)
        assert int(np.argmax(energies)) == o
    with pytest.raises(ValueError, match="channels"):
        oriented_filter_bank(torch.zeros(4, 3, 2, 14, 14))


def test_the_cued_task_names_the_target_quarter_and_zoom_find_draws_the_same_scene(tmp_path):
    cfg = load_config(overrides=["data.synthetic_task=zoom"])
    cued = read_deepeyes([write_synthetic(str(tmp_path / "c.parquet"), 24, 5, mix={"zoom": 1.0})], cfg.data).rows
    plain = read_deepeyes([write_synthetic(str(tmp_path / "f.parquet"), 24, 5, mix={"zoom_find": 1.0})], cfg.data).rows
    for c, f in zip(cued, plain):
        x1, y1, x2, y2 = c.extra["target_bbox"]
        # the quarter that holds the red frame's centre, named independently of the generator's slot
        place = ("north" if (y1 + y2) / 2 < 784 else "south") + ("west" if (x1 + x2) / 2 < 784 else "east")
        assert f" {place} quarter?" in c.question and sum(p in c.question for p in ZOOM_PLACES) == 1
        assert not any(p in f.question for p in ZOOM_PLACES)  # zoom_find: find it by sight
        assert f.extra["target_bbox"] == c.extra["target_bbox"] and f.ground_truth == c.ground_truth
        assert c.image_bytes[0] == f.image_bytes[0]  # same stream, same pixels: only the question differs
        assert c.ground_truth not in c.question.split("?")[0]  # the cue says where, never what


def test_cold_start_mixes_direct_and_zoom_conversations_with_seen_answers(zoom_rows):
    pick = random.Random(0)
    row = zoom_rows[0]
    cfg = load_config(overrides=["data.synthetic_task=zoom", "tools.crop_from=original", "trainer.sft_box_grid=8"])
    # 'seen': the truth after a zoom (the crop shows it), a uniform option when answering at once
    assert all(sft_answer(row, "seen", pick, zooms=True) == row.ground_truth for _ in range(20))
    drawn = collections.Counter(sft_answer(row, "seen", pick, zooms=False) for _ in range(400))
    assert set(drawn) == set(ORIENTATIONS) and min(drawn.values()) > 60
    messages, images = tool_conversation(row, cfg, "vertical", zoom=False)
    assert len(images) == 1 and "tool_calls" not in messages[-1]
    messages, images = tool_conversation(row, cfg, "vertical", zoom=True)
    place = next(p for p in ZOOM_PLACES if f" {p} quarter" in row.question)
    assert len(images) == 2 and f"the {place} quarter" in messages[-3]["content"]  # the thought says where
