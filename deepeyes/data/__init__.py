"""The data pipeline: DeepEyes-schema parquet in, validated prompt rows out; plus a synthetic twin.

Reading (`read_deepeyes`, `ParquetRows`, `RowStream`; rows.py, stream.py): the DeepEyes-Datasets-47k
columns `data_source`, `prompt` (system + user turns; the user text holds one `<image>` marker per
image), `images` (list of {bytes, path}), `reward_model` ({ground_truth, style}), `extra_info`
({answer, question, index, split, ...}), `ability`, `env_name`. Files stream through pyarrow a row
group at a time; every row is checked before it is used, and a malformed row is skipped and counted
under a named reason (`SKIP_REASONS`), never a crash.

Writing (`write_synthetic`, `write_synthetic_suite`; synthetic.py, zoom.py, scene.py): the same
schema, deterministically (same seed, same bytes): V*-like scenes, ThinkLite-like dot arithmetic,
charts, and the main job's zoom task (`data.synthetic_task=zoom`).

Answer convention: `reward_model.ground_truth` is the answer WORD (or number), never an option
letter; multiple-choice questions list `(A) word (B) word ...` and `extra_info.options` keeps the
list, so a judge can map a letter answer to its word. `extra_info.target_bbox` is [x1, y1, x2, y2]
in original image pixels (x2, y2 exclusive, a PIL crop box); `extra_info.target_attribute` names
what is asked.

CLI (cli.py): `python -m deepeyes.data synth --out DIR --rows N --seed S` and
`python -m deepeyes.data inspect FILE...`.
"""

from deepeyes.data.cli import main
from deepeyes.data.rows import (CHART_FILE, IMAGE_MARKER, MAX_ASPECT_RATIO, READ_BATCH_ROWS, SKIP_REASONS,
                                SOURCES, THINKLITE_FILE, TOOL_ENV, VSTAR_FILE, DataSet, Row, RowSkipped,
                                is_chart_file, parse_row, upscale_to_min_side)
from deepeyes.data.scene import LETTERS, TARGET_COLOURS, clutter
from deepeyes.data.stream import (REQUIRED_COLUMNS, ROW_COLUMNS, SAMPLE_CHECK_ROWS, ParquetRows, RowStream,
                                  SkipCounter, read_deepeyes)
from deepeyes.data.synthetic import (DEFAULT_MIX, DOT_NAMES, MAX_TARGET_PX_IN_FRAME, SHAPES, SIGN_COLOURS,
                                     SPLIT_CODES, STRIPES, SYNTHETIC_SCHEMA, WORDS, mix_counts, vstar_scene,
                                     write_synthetic, write_synthetic_suite)
from deepeyes.data.zoom import (ZOOM_DARK, ZOOM_DISTRACTORS, ZOOM_LIGHT, ZOOM_ORIENTATIONS, ZOOM_PLACES,
                                ZOOM_SCENE, ZOOM_SIDE, ZOOM_SLOTS, ZOOM_TARGET, ZOOM_TASKS, zoom_question,
                                zoom_stripes, zoom_task)

__all__ = [
    # rows.py
    "CHART_FILE", "IMAGE_MARKER", "MAX_ASPECT_RATIO", "READ_BATCH_ROWS", "SKIP_REASONS", "SOURCES",
    "THINKLITE_FILE", "TOOL_ENV", "VSTAR_FILE", "DataSet", "Row", "RowSkipped", "is_chart_file", "parse_row",
    "upscale_to_min_side",
    # stream.py
    "REQUIRED_COLUMNS", "ROW_COLUMNS", "SAMPLE_CHECK_ROWS", "ParquetRows", "RowStream", "SkipCounter",
    "read_deepeyes",
    # scene.py, synthetic.py
    "LETTERS", "TARGET_COLOURS", "clutter",
    "DEFAULT_MIX", "DOT_NAMES", "MAX_TARGET_PX_IN_FRAME", "SHAPES", "SIGN_COLOURS", "SPLIT_CODES", "STRIPES",
    "SYNTHETIC_SCHEMA", "WORDS", "mix_counts", "vstar_scene", "write_synthetic", "write_synthetic_suite",
    # zoom.py
    "ZOOM_DARK", "ZOOM_DISTRACTORS", "ZOOM_LIGHT", "ZOOM_ORIENTATIONS", "ZOOM_PLACES", "ZOOM_SCENE", "ZOOM_SIDE",
    "ZOOM_SLOTS", "ZOOM_TARGET", "ZOOM_TASKS", "zoom_question", "zoom_stripes", "zoom_task",
    # cli.py
    "main",
]
