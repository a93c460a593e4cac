"""What the synthetic scenes share: the target colours, the option letters and the cluttered
background every large scene is drawn on."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

TARGET_COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 230), "green": (20, 170, 40),
                  "yellow": (240, 220, 20), "orange": (245, 130, 20), "purple": (140, 40, 200)}
LETTERS = "ABCDEFGH"


def clutter(rng: np.random.Generator, w: int, h: int) -> Image.Image:
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
