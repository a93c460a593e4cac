"""What an evaluation writes: OUT/items.jsonl (one record per episode) with small JPEG thumbnails
for `python -m trainer view`, and the summary JSON. Light on purpose (no torch, no Ray): the CLI's
`--help` and the viewer's tests import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepeyes.boxes import parse_box
from trainer.metrics import target_box, thumbnail_jpeg

IMAGE_KB = 16384  # default per-run budget of the thumbnails kept for `python -m trainer view`


class ItemsWriter:
    """OUT/items.jsonl, one record per episode as run_items hands it over (its `on_record`), and
    small JPEG thumbnails in OUT/images/ for `python -m trainer view`.

    Each record with a trajectory gets the episode's `uid` and `question` (the prompt text as
    shown, options in the sample's order), the model frame's size in `images` (its thumbnail's
    path relative to OUT in `file`), `target_box` in the model frame, and per tool call its `box`
    in the model frame, whether its crop was `appended`, and the crop's thumbnail in `image`.
    Thumbnails (longest side trainer.metrics.THUMBNAIL_SIDE) are kept until `image_kb` KiB are
    spent over the whole run (0 = none; `file`/`image` is then None): an item's frame once, shared
    by its samples and both modes, first come first served; the crops of tool calls only while
    less than half the budget is spent, so the frames of later items keep their share.
    """

    def __init__(self, out_dir: str | Path, image_kb: int = IMAGE_KB):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "items.jsonl"
        self.file = self.path.open("w")
        self.budget = max(image_kb, 0) * 1024
        self.spent = 0
        self.frames: dict[tuple[str, str], str | None] = {}  # (benchmark, item) -> its frame's file
        self.episodes = 0

    def _save(self, image: Any, name: str, limit: int) -> str | None:
        if self.spent >= limit:
            return None
        data = thumbnail_jpeg(image)
        if self.spent + len(data) > limit:
            return None
        self.spent += len(data)
        (self.out / "images").mkdir(exist_ok=True)
        (self.out / "images" / name).write_bytes(data)
        return f"images/{name}"

    def _annotate(self, record: dict[str, Any], traj: Any) -> None:
        record["uid"], record["question"] = traj.uid, traj.question
        if not traj.images:
            return
        key = (str(record.get("benchmark")), str(record.get("item")))
        if key not in self.frames:
            self.frames[key] = self._save(traj.images[0], f"item_{len(self.frames):06d}.jpg", self.budget)
        frame = traj.images[0]
        record["images"] = [{"file": self.frames[key], "width": frame.width, "height": frame.height}]
        record["target_box"] = target_box(traj)
        # traj.images[first_crop:] are the crops, in the order of the calls whose result was appended
        returned = [c for c in traj.tool_calls if c.ok and c.appended]
        first_crop = len(traj.images) - len(returned)
        crop_of = {id(c): first_crop + j for j, c in enumerate(returned)}
        for c, rec in zip(traj.tool_calls, record.get("tool_calls", [])):
            rec["box"], rec["appended"], rec["image"] = parse_box(c.arguments), c.appended, None
            if id(c) in crop_of and first_crop > 0:
                k = crop_of[id(c)]
                rec["image"] = self._save(traj.images[k], f"crop_{self.episodes:06d}_{k}.jpg", self.budget // 2)

    def __call__(self, record: dict[str, Any], traj: Any) -> None:
        if traj is not None:
            self._annotate(record, traj)
        self.episodes += 1
        self.file.write(json.dumps(record, default=str) + "\n")

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "ItemsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
