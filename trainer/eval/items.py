"""Benchmark items from the files as distributed: V* Bench, HR-Bench (TSV), DeepEyes-schema parquet.

Every reader is a generator of `Item`s, one row at a time, with the image kept encoded (bytes
read when the item is run), so memory does not grow with the benchmark. A malformed file is a
`BenchmarkFormatError` naming the file, the row and the missing field.

Layouts read (the first two are what the benchmarks' repositories ship):
- V* Bench, a folder: category folders (`direct_attributes/`, `relative_position/`) of images,
  each with an annotation JSON of the same stem, `{"question", "options": [correct first, ...],
  "target_object", "bbox"}` (what the DeepEyes eval reads; the correct option is listed first,
  which is why the options are shuffled here), or, when no per-image JSON is found,
  `test_questions.jsonl` at the root: `{"question_id", "image", "text" (question and
  "(A) ..." option lines), "category", "label" (the letter)}`. A .jsonl file may be given directly.
- HR-Bench 4K/8K: one TSV, columns `index, question, answer (letter), category, A, B[, C, D],
  image (base64)`; other columns are ignored.
- DeepEyes-schema parquet (the project's synthetic set, data.val_files): `extra_info.options`
  lists the options and `reward_model.ground_truth` is the answer word; rows without options are
  free-form (judged).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

LETTERS = "ABCDEFGHIJ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_OPTION_LINE = re.compile(r"^\s*\(([A-J])\)\s*(.+?)\s*$")


class BenchmarkFormatError(ValueError):
    """A benchmark file that does not have the layout its reader expects."""

    def __init__(self, path: str | Path, row: Any, problem: str):
        self.path, self.row, self.problem = str(path), row, problem
        super().__init__(f"{path}: row {row}: {problem}")


@dataclass
class Item:
    """One benchmark question.

    `options` are the option texts in the file's order and `answer` the index of the correct one;
    with no options the item is free-form and `answer` is the reference text. `image` is the
    encoded image file (bytes), read when the item is built. `style` lists options one per line
    (`lines`, V*/HR-Bench) or inline after "Options:" (`inline`, the synthetic set's prompts).
    """

    benchmark: str
    id: str
    category: str
    question: str
    options: list[str]
    answer: int | str
    image: bytes
    instruction: str = MC_INSTRUCTION
    style: str = "lines"
    target_bbox: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)


def _need(path: Path, row: Any, record: dict[str, Any], key: str) -> Any:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BenchmarkFormatError(path, row, f"missing field {key!r}")
    return value


def _letter_index(path: Path, row: Any, letter: Any, n: int) -> int:
    s = str(letter).strip().strip("()").upper()
    if len(s) != 1 or s not in LETTERS[:n]:
        raise BenchmarkFormatError(path, row, f"answer {letter!r} is not one of the option letters "
                                              f"{', '.join(LETTERS[:n])}")
    return LETTERS.index(s)


def _read_bytes(path: Path, row: Any, image: Path) -> bytes:
    if not image.is_file():
        raise BenchmarkFormatError(path, row, f"image file {image} does not exist")
    return image.read_bytes()


# ---------------------------------------------------------------------------------------------
# V* Bench


def _vstar_bbox(anno: dict[str, Any]) -> list[float] | None:
    """The first target box as [x1, y1, x2, y2] (V* stores [x, y, w, h])."""
    boxes = anno.get("bbox")
    if isinstance(boxes, list) and boxes and isinstance(boxes[0], list) and len(boxes[0]) == 4:
        x, y, w, h = (float(v) for v in boxes[0])
        return [x, y, x + w, y + h]
    return None


def read_vstar(path: str | Path) -> Iterator[Item]:
    """V* items from the benchmark folder (per-image JSON, else test_questions.jsonl) or a .jsonl."""
    root = Path(path)
    if root.is_file():
        yield from _vstar_jsonl(root, root.parent)
        return
    if not root.is_dir():
        raise FileNotFoundError(f"V* Bench: {root} is neither the benchmark folder nor its .jsonl")
    annos = sorted(p for p in root.glob("*/*.json"))
    if not annos:
        jsonl = root / "test_questions.jsonl"
        if not jsonl.exists():
            raise BenchmarkFormatError(root, "-", "no <category>/<image>.json annotations and no "
                                                  "test_questions.jsonl: not a V* Bench folder")
        yield from _vstar_jsonl(jsonl, root)
        return
    for anno_path in annos:
        row = anno_path.name
        try:
            anno = json.loads(anno_path.read_text())
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(anno_path, row, f"not JSON ({e.msg})") from None
        if not isinstance(anno, dict):
            raise BenchmarkFormatError(anno_path, row, "not a JSON object")
        question = str(_need(anno_path, row, anno, "question"))
        options = _need(anno_path, row, anno, "options")
        if not isinstance(options, list) or len(options) < 2:
            raise BenchmarkFormatError(anno_path, row, "field 'options' is not a list of 2 or more options")
        image = next((anno_path.with_suffix(s) for s in IMAGE_SUFFIXES if anno_path.with_suffix(s).exists()), None)
        if image is None:
            raise BenchmarkFormatError(anno_path, row, f"no image file next to it ({anno_path.stem}.jpg/.png)")
        yield Item(benchmark="vstar", id=f"{anno_path.parent.name}/{anno_path.stem}",
                   category=anno_path.parent.name, question=question.strip(),
                   options=[str(o).strip() for o in options], answer=0, image=image.read_bytes(),
                   target_bbox=_vstar_bbox(anno))


def _vstar_jsonl(path: Path, root: Path) -> Iterator[Item]:
    with path.open() as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkFormatError(path, n, f"not JSON ({e.msg})") from None
            text = str(_need(path, n, rec, "text"))
            image = str(_need(path, n, rec, "image"))
            category = str(_need(path, n, rec, "category"))
            label = _need(path, n, rec, "label")
            stem, options = [], []
            for part in text.splitlines():
                m = _OPTION_LINE.match(part)
                if m:
                    options.append(m.group(2))
                elif not options:
                    stem.append(part)
            if len(options) < 2:
                raise BenchmarkFormatError(path, n, "field 'text' lists fewer than 2 '(A) ...' option lines")
            yield Item(benchmark="vstar", id=str(rec.get("question_id", n)), category=category,
                       question="\n".join(stem).strip(), options=options,
                       answer=_letter_index(path, n, label, len(options)), image=_read_bytes(path, n, root / image))


# ---------------------------------------------------------------------------------------------
# HR-Bench

HR_REQUIRED = ("index", "question", "answer", "category", "A", "B", "image")


def read_hrbench(path: str | Path, benchmark: str | None = None) -> Iterator[Item]:
    """HR-Bench items from its TSV (base64 images), streamed row by row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HR-Bench: {path} does not exist (give the hr_bench_4k/8k .tsv)")
    name = benchmark or ("hrbench_8k" if "8k" in path.name.lower() else
                         "hrbench_4k" if "4k" in path.name.lower() else "hrbench")
    csv.field_size_limit(sys.maxsize)  # one 8K image is tens of MB of base64 in one field
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in HR_REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkFormatError(path, "header", f"missing column(s) {missing} "
                                                       f"(has {reader.fieldnames})")
        for n, rec in enumerate(reader, start=1):
            for key in HR_REQUIRED:
                _need(path, n, rec, key)
            options = [rec[c].strip() for c in "ABCDEFGH" if (rec.get(c) or "").strip()]
            try:
                image = base64.b64decode(rec["image"], validate=True)
            except (binascii.Error, ValueError):
                raise BenchmarkFormatError(path, n, "field 'image' is not base64") from None
            yield Item(benchmark=name, id=str(rec["index"]).strip(), category=rec["category"].strip(),
                       question=rec["question"].strip(), options=options,
                       answer=_letter_index(path, n, rec["answer"], len(options)), image=image)


# ---------------------------------------------------------------------------------------------
# DeepEyes-schema rows (the synthetic set, data.val_files)


def item_from_row(row: Any, benchmark: str = "synthetic") -> Item:
    """A deepeyes.data.Row as an Item: options from extra_info.options, else free-form."""
    extra = dict(row.extra)
    options = [str(o) for o in (extra.get("options") or [])]
    question = str(extra.get("question") or row.question)
    instruction, style = "", "inline"
    if options and "\nOptions:" in question:
        stem, rest = question.split("\nOptions:", 1)
        tail = rest.split("\n", 1)
        instruction = tail[1].strip() if len(tail) > 1 else ""
        question = stem.strip()
    truth = row.ground_truth
    answer: int | str = truth
    if options:
        norm = [o.strip().lower() for o in options]
        if truth.strip().lower() in norm:
            answer = norm.index(truth.strip().lower())
        else:  # the reference is not among the listed options: judge it free-form
            options, question = [], str(extra.get("question") or row.question)
    category = str(extra.get("kind") or row.data_source or "all")
    return Item(benchmark=benchmark, id=str(row.index), category=category, question=question,
                options=options, answer=answer, image=row.image_bytes[0], instruction=instruction,
                style=style, target_bbox=extra.get("target_bbox"),
                extra={"data_source": row.data_source})


def read_parquet(files: list[str], data_cfg: Any, benchmark: str = "synthetic") -> Iterator[Item]:
    """Items of DeepEyes-schema parquet files, rows checked by deepeyes.data as they stream."""
    import deepeyes.data as data  # the viewer imports this module: it stays light

    if hasattr(data, "ParquetRows"):  # one row group in memory at a time
        rows: Iterable[Any] = data.ParquetRows(files, data_cfg).iter_rows()
    else:
        rows = data.read_deepeyes(files, data_cfg)
    for row in rows:
        yield item_from_row(row, benchmark)


def limit(items: Iterable[Item], n: int) -> Iterator[Item]:
    """The first n items (n <= 0: all)."""
    for i, item in enumerate(items):
        if 0 < n <= i:
            return
        yield item
