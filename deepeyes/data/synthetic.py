"""Synthetic DeepEyes-schema data, written deterministically (same seed, same bytes): the scene
makers (V*, ThinkLite, Chart, and the zoom task's two variants), `write_synthetic` for one file of
a mix and `write_synthetic_suite` for the real dataset's three-file layout.

- `vstar`: a 1024-2048 px cluttered scene with ONE small target (a coloured shape, a word on a
  coloured sign, or a striped square in a coloured frame) whose asked attribute (shape / word /
  stripe orientation) is below 6 px in the model's 224x224-ish frame but plain in a native crop;
- `thinklite_eureka`: 8-27 px images of 1-3 dark dots and an arithmetic question (number answer);
- `chart`: 3000-4096 px flat-colour bar charts with small value labels to read;
- `zoom` / `zoom_find` (not in the suite): the main job's task (deepeyes.data.zoom).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from deepeyes.config import DEFAULT_MAX_PIXELS
from deepeyes.data.rows import CHART_FILE, IMAGE_MARKER, THINKLITE_FILE, TOOL_ENV, VSTAR_FILE
from deepeyes.data.scene import LETTERS, TARGET_COLOURS, clutter
from deepeyes.data.agentic import agentic_task
from deepeyes.data.zoom import zoom_task

DEFAULT_MIX = {"vstar": 0.75, "thinklite_eureka": 0.15, "chart": 0.10}
MAX_TARGET_PX_IN_FRAME = 5.5  # the target box's longest side in that frame, at most
SIGN_COLOURS = {"yellow": (245, 225, 40), "orange": (250, 150, 40), "cyan": (60, 220, 235),
                "pink": (250, 150, 200)}
SHAPES = ("circle", "square", "triangle", "star")
STRIPES = ("horizontal", "vertical", "diagonal")
WORDS = ("LION", "BOAT", "KITE", "MOON", "FISH", "TREE", "STAR", "DOOR", "BIRD", "LAMP",
         "CAKE", "ROSE", "SHIP", "WOLF", "BELL", "RING", "CAT", "SUN", "OWL", "BUS")
DOT_NAMES = {1: "one", 2: "two", 3: "three"}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

SYNTHETIC_SCHEMA = pa.schema([
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
        ("tools", pa.list_(pa.string())),  # the row's tools (agentic rows); null = the run's tools.enabled
    ])),
])


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Fixed options (same pixels, same bytes); level 1: 3-4x faster than 6 on 16 MP charts, ~2x larger.
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's embedded font: identical on every machine


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


def vstar_scene(rng: np.random.Generator) -> dict[str, Any]:
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
    image = clutter(rng, w, h)
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


_MAKERS = {"vstar": vstar_scene, "thinklite_eureka": _thinklite, "chart": _chart, "zoom": zoom_task,
           "zoom_find": lambda rng: zoom_task(rng, cued=False), "agentic": agentic_task}


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
    records: dict[str, list[Any]] = {name: [] for name in SYNTHETIC_SCHEMA.names}
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
            "options": made["options"], "tools": made.get("tools")})
    table = pa.Table.from_pydict(records, schema=SYNTHETIC_SCHEMA)
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
