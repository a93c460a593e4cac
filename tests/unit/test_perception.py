"""The tiny policy's perception pre-stage (trainer.perception): close-ups cut by the zoom tool from
scenes of any frame colour, a question about that frame, and a cached folder from_pretrained loads."""

from __future__ import annotations

import json

import numpy as np

import trainer.perception as perception
from deepeyes.config import load_config
from deepeyes.data import TARGET_COLOURS, ZOOM_ORIENTATIONS
from deepeyes.policy import build_tiny_policy, load_policy


def test_closeups_show_stripes_of_any_frame_colour_at_model_size():
    cfg = load_config("deploy/configs/tiny-zoom.yaml", [])
    rng = np.random.default_rng([0, perception.SEED_STREAM])
    colours = set()
    for _ in range(12):
        crop, question, answer = perception.closeup(rng, cfg)
        colour = question.split("inside the ")[1].split(" frame")[0]
        colours.add(colour)
        assert colour in TARGET_COLOURS and answer in ZOOM_ORIENTATIONS
        assert "quarter" not in question  # a close-up question: nothing about where
        assert crop.size[0] * crop.size[1] <= cfg.model.max_pixels
        a = np.asarray(crop).astype(float)
        h, w = a.shape[:2]
        centre = a[h // 2 - 6:h // 2 + 6, w // 2 - 6:w // 2 + 6]
        assert centre.std() > 40  # the stripes are plain in the crop (the frame shows flat grey)
    assert len(colours) >= 3


def test_the_prestage_writes_a_cached_folder_that_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(perception, "PERCEPTION_ROWS", 4)
    monkeypatch.setattr(perception, "PERCEPTION_HELD_OUT", 4)
    base = build_tiny_policy(tmp_path / "tiny", vision="oriented")
    cfg = load_config("deploy/configs/tiny-zoom.yaml",
                      [f"model.cache_dir={tmp_path / 'cache'}", "model.tiny_perception_steps=2"])
    folder = perception.perceiving_policy_path(cfg, base, progress=False)
    info = json.loads((folder / "perception.json").read_text())
    assert info["steps"] == 2 and info["rows"] == 4 and 0.0 <= info["held_out_read_acc"] <= 1.0
    before = load_policy(base).model.state_dict()
    after = load_policy(folder).model.state_dict()
    assert any(not (before[k] == after[k]).all() for k in before)  # the steps changed the weights
    assert perception.perceiving_policy_path(cfg, base, progress=False) == folder  # cached: no rebuild
