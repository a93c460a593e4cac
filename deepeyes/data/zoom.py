"""The embedded demo's task (`data.synthetic_task=zoom`): which way the stripes inside a red frame
run, readable only in a crop cut from the original (`zoom_task`); the question names the frame's
quarter. `zoom_find` is the same scene with no place named."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from deepeyes.config import DEFAULT_MAX_PIXELS
from deepeyes.data.rows import TOOL_ENV
from deepeyes.data.scene import LETTERS, TARGET_COLOURS, clutter

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


def zoom_task(rng: np.random.Generator, cued: bool = True, target: str = ZOOM_TARGET) -> dict[str, Any]:
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
    image = clutter(rng, w, h)
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


ZOOM_TASKS = ("zoom", "zoom_find", "agentic")  # data.synthetic_task values that write one file of that maker
