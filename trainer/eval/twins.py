"""Small twins of the benchmarks' distributed files, for tests and the demo.

`write_vstar_twin(dir)` writes the V* Bench folder layout (category folders of JPEG images with a
per-image annotation JSON, correct option first, bbox as [x, y, w, h]; and test_questions.jsonl
with the letter label); `write_hrbench_twin(path)` writes an HR-Bench TSV (index, question,
answer letter, category, A-D, base64 image). Each image is a large noisy scene with ONE small
coloured square; the question asks its colour, so the answer is known and a zoom helps.

    python -m trainer.eval.twins OUT_DIR [--items 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 230), "green": (20, 170, 40), "yellow": (245, 225, 40),
           "purple": (140, 40, 180), "orange": (250, 140, 30)}
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
HR_CATEGORIES = ("single", "cross")


def _scene(rng: np.random.Generator, size: tuple[int, int], colour: str) -> tuple[Image.Image, list[int]]:
    """A grey noisy scene with one small square of `colour`; returns the image and its [x, y, w, h]."""
    w, h = size
    noise = rng.integers(90, 166, size=(h // 8, w // 8, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((w, h), Image.Resampling.NEAREST)
    side = int(rng.integers(max(12, w // 80), max(13, w // 40)))
    x, y = int(rng.integers(side, w - 2 * side)), int(rng.integers(side, h - 2 * side))
    ImageDraw.Draw(image).rectangle([x, y, x + side - 1, y + side - 1], fill=COLOURS[colour])
    return image, [x, y, side, side]


def _options(rng: np.random.Generator, answer: str, n: int) -> list[str]:
    others = [c for c in COLOURS if c != answer]
    return [answer] + [str(c) for c in rng.choice(others, size=n - 1, replace=False)]


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_vstar_twin(out_dir: str | Path, items: int = 6, seed: int = 0,
                     size: tuple[int, int] = (1200, 900)) -> Path:
    """A V* Bench folder with `items` questions (4 options in direct_attributes, 2 in
    relative_position, as the real split); returns the folder. Answers: the file's first option."""
    root = Path(out_dir)
    rng = np.random.default_rng([seed, 17])
    lines = []
    for i in range(items):
        category = VSTAR_CATEGORIES[i % 2]
        answer = str(rng.choice(list(COLOURS)))
        image, bbox = _scene(rng, size, answer)
        options = _options(rng, answer, 4 if category == "direct_attributes" else 2)
        folder = root / category
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"sa_{seed}_{i}"
        (folder / f"{stem}.jpg").write_bytes(_encode(image, "JPEG"))
        question = "What is the color of the small square?"
        (folder / f"{stem}.json").write_text(json.dumps(
            {"target_object": ["square"], "bbox": [bbox], "question": question, "options": options}))
        order = rng.permutation(len(options))  # the jsonl lists them in another order, letter labelled
        listing = "\n".join(f"({'ABCD'[j]}) {options[k]}" for j, k in enumerate(order))
        lines.append(json.dumps({"image": f"{category}/{stem}.jpg", "question_id": i, "category": category,
                                 "text": f"{question}\n{listing}\nAnswer with the option's letter from the "
                                         f"given choices directly.",
                                 "label": "ABCD"[int(np.where(order == 0)[0][0])]}))
    (root / "test_questions.jsonl").write_text("\n".join(lines) + "\n")
    return root


HR_COLUMNS = ["index", "question", "answer", "category", "A", "B", "C", "D", "image"]


def write_hrbench_twin(path: str | Path, items: int = 6, seed: int = 0,
                       size: tuple[int, int] = (1600, 900)) -> Path:
    """An HR-Bench TSV with `items` 4-option questions (categories single/cross); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 29])
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        writer.writerow(HR_COLUMNS)
        for i in range(items):
            answer = str(rng.choice(list(COLOURS)))
            image, _ = _scene(rng, size, answer)
            options = _options(rng, answer, 4)
            order = [int(k) for k in rng.permutation(4)]
            shown = [options[k] for k in order]
            writer.writerow([i, "What is the color of the small square in the image?", "ABCD"[order.index(0)],
                             HR_CATEGORIES[i % 2], *shown, base64.b64encode(_encode(image, "JPEG")).decode()])
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.eval.twins", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--items", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_vstar_twin(Path(args.out_dir) / "vstar_bench", args.items, args.seed))
    print(write_hrbench_twin(Path(args.out_dir) / "hr_bench_4k.tsv", args.items, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
