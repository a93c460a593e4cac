"""Parquet streaming: DeepEyes-schema files read lazily a row group at a time (`ParquetRows`), their
seeded, resumable epoch order (`RowStream`), and the all-in-memory read (`read_deepeyes`).

A malformed row is skipped, counted under a named reason (`SKIP_REASONS`) and logged once per
reason, never a crash.
"""

from __future__ import annotations

import collections
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
from pyarrow import fs
from PIL import Image
from tqdm import tqdm

from deepeyes.config import DataConfig
from deepeyes.data.rows import SKIP_REASONS, DataSet, Row, RowSkipped, is_chart_file, parse_row

log = logging.getLogger(__name__)

ROW_COLUMNS = ("data_source", "prompt", "images", "reward_model", "extra_info", "ability", "env_name")
REQUIRED_COLUMNS = {"data_source", "prompt", "images", "reward_model"}
SAMPLE_CHECK_ROWS = 8  # rows of each file parsed at start (ParquetRows.sample_check): a bounded decode


class SkipCounter:
    """Skipped rows by reason; the first row of each reason is logged with what a user can do."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, reason: str, detail: str, where: str, count: int = 1) -> None:
        if count == 0:
            return
        if reason not in self.counts:
            log.warning("skipping %s: %s (%s). %s. Further rows with this reason are only counted.",
                        where, reason, detail, SKIP_REASONS[reason])
        self.counts[reason] += count


@dataclass
class _Group:
    """One parquet row group: raw rows [start, start + rows) of the stream."""

    file: int
    group: int
    start: int
    rows: int


def _open_parquet(path: str) -> pq.ParquetFile:
    """A local path or any URI pyarrow's filesystems accept (s3://, gs://, hdfs://, file://)."""
    if "://" in path:
        filesystem, inner = fs.FileSystem.from_uri(path)
        try:
            return pq.ParquetFile(filesystem.open_input_file(inner))
        except FileNotFoundError:
            raise FileNotFoundError(f"data file {path} does not exist; check data.train_files / "
                                    "data.val_files (empty lists mean synthetic data)") from None
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist; check data.train_files / "
                                "data.val_files (empty lists mean synthetic data)")
    return pq.ParquetFile(path)


class ParquetRows:
    """DeepEyes-schema parquet files as raw rows read lazily, one row group at a time.

    Opening reads metadata only: every file's schema is checked (a file lacking a required column
    fails at once), the Chart file is left out whole (counted) unless data.include_chart, and the
    row groups are indexed. Raw row r is the r-th row of the kept files in the order given. Rows
    are parsed and checked (`parse`) when they are used, so a bad row is skipped and counted in
    `skipped` when it streams by, with the same reasons and messages as a full read.
    Row ids are `extra_info.index`; an id already taken by another raw row gets `file:rownum`.
    """

    def __init__(self, files: list[str], cfg: DataConfig) -> None:
        if cfg.max_image_pixels > (Image.MAX_IMAGE_PIXELS or 0) and Image.MAX_IMAGE_PIXELS is not None:
            # PIL refuses images above 2x its own limit at open; our configured cap is the rule here.
            Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
        self.cfg = cfg
        self.files = [str(f) for f in files]
        self.skipped = SkipCounter()
        self.groups: list[_Group] = []
        self._handles: dict[int, pq.ParquetFile] = {}
        self._columns: dict[int, list[str]] = {}
        self._file_start: dict[int, int] = {}
        self._ids: dict[str, int] = {}
        self._bad: set[int] = set()  # raw rows found unusable
        self._dup_logged = False
        start = 0
        for i, path in enumerate(self.files):
            pf = _open_parquet(path)
            total = pf.metadata.num_rows
            if is_chart_file(path) and not cfg.include_chart:
                self.skipped("chart_excluded", f"whole file, {total} rows", Path(path).name, count=total)
                continue
            columns = set(pf.schema_arrow.names)
            missing = REQUIRED_COLUMNS - columns
            if missing:
                raise ValueError(f"{path} lacks column(s) {sorted(missing)}: not a DeepEyes-schema parquet "
                                 f"(has {sorted(columns)})")
            self._handles[i] = pf
            self._columns[i] = [c for c in ROW_COLUMNS if c in columns]
            self._file_start[i] = start
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if n:
                    self.groups.append(_Group(i, g, start, n))
                    start += n
        self.num_rows = start

    def __len__(self) -> int:
        """Raw rows in the kept files (bad rows among them are skipped when they stream by)."""
        return self.num_rows

    def read_group(self, gi: int) -> list[dict[str, Any]]:
        g = self.groups[gi]
        return self._handles[g.file].read_row_group(g.group, columns=self._columns[g.file]).to_pylist()

    def parse(self, raw: int, record: dict[str, Any], group: _Group) -> Row | None:
        """The checked row of raw row `raw`, or None (skipped; counted the first time only, so
        the counts are the data's bad rows however many epochs pass over them)."""
        if raw in self._bad:
            return None
        name = Path(self.files[group.file]).name
        where = f"{name}:{raw - self._file_start[group.file]}"
        try:
            row = parse_row(record, where, self.cfg)
        except RowSkipped as e:
            self._bad.add(raw)
            self.skipped(e.reason, e.detail, where)
            return None
        if self._ids.setdefault(row.index, raw) != raw:
            # Real files number rows per file, so ids repeat across files; GRPO groups by id,
            # so repeats must not merge.
            if not self._dup_logged:
                log.info("extra_info.index %s repeats (at %s); repeats get file:rownum ids", row.index, where)
                self._dup_logged = True
            row.index = where
        row.position = raw
        return row

    def iter_rows(self, progress: bool = False) -> Iterator[Row]:
        """Every usable row in file order, one row group in memory at a time."""
        with tqdm(total=self.num_rows, desc="rows", unit="row", disable=None if progress else True,
                  leave=False) as bar:
            for gi, g in enumerate(self.groups):
                for k, record in enumerate(self.read_group(gi)):
                    row = self.parse(g.start + k, record, g)
                    if row is not None:
                        yield row
                bar.update(g.rows)

    def sample_check(self, rows_per_file: int = SAMPLE_CHECK_ROWS) -> collections.Counter[str]:
        """Parse the first rows of every kept file (a bounded decode, counted apart from `skipped`);
        returns the skip reasons seen. Raises ValueError when no sampled row is usable."""
        seen: collections.Counter[str] = collections.Counter()
        usable = 0
        first_groups = {}
        for gi, g in enumerate(self.groups):
            first_groups.setdefault(g.file, gi)
        for f, gi in first_groups.items():
            g = self.groups[gi]
            table = self._handles[f].read_row_group(g.group, columns=self._columns[f]).slice(0, rows_per_file)
            for k, record in enumerate(table.to_pylist()):
                try:
                    parse_row(record, f"{Path(self.files[f]).name}:{k}", self.cfg)
                    usable += 1
                except RowSkipped as e:
                    seen[e.reason] += 1
        if self.num_rows and not usable:
            raise ValueError(f"no usable row among the first {rows_per_file} of each file of {self.files}: "
                             + ", ".join(f"{k}={v} ({SKIP_REASONS[k]})" for k, v in sorted(seen.items())))
        return seen


class RowStream:
    """The seeded epoch-wise order of a ParquetRows, read with bounded memory; (epoch, pos) resumes it.

    An epoch's order: the row groups in a seeded permutation, their raw rows passed through a
    seeded shuffle buffer of `buffer_rows` rows (the order is computed from row numbers alone, so
    it is exact and cheap to replay). Rows are read a row group at a time as the order reaches
    them; a row read ahead waits at most about `buffer_rows` positions, so at most
    `buffer_rows` + one row group of encoded rows are held. `take(k)` returns the next k usable
    rows; a bad row is skipped (counted in the source) and the next one taken, so every caller
    that takes the same counts from the same state gets the same rows. `shuffle=False` is file
    order. `pos` counts raw positions of the epoch's order, usable or not.
    """

    def __init__(self, source: ParquetRows, seed: int, shuffle: bool = True, buffer_rows: int = 256,
                 epoch: int = 0, pos: int = 0) -> None:
        if source.num_rows == 0:
            raise ValueError(f"no rows to stream in {source.files} (skipped: {dict(source.skipped.counts)})")
        self.source, self.seed, self.shuffle, self.buffer_rows = source, seed, shuffle, max(1, buffer_rows)
        self.epoch, self.pos = epoch, pos
        self._start_epoch()

    def _start_epoch(self) -> None:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups = list(range(len(self.source.groups)))
        if self.shuffle:
            rng.shuffle(groups)
        self._group_order = groups
        sequence = [r for gi in groups for r in range(self.source.groups[gi].start,
                                                      self.source.groups[gi].start + self.source.groups[gi].rows)]
        if self.shuffle:
            order, buffer = [], []
            for r in sequence:
                if len(buffer) < self.buffer_rows:
                    buffer.append(r)
                    continue
                j = rng.randrange(self.buffer_rows)
                order.append(buffer[j])
                buffer[j] = r
            rng.shuffle(buffer)
            sequence = order + buffer
        self._order = sequence
        self._held: dict[int, tuple[dict[str, Any], _Group]] = {}
        self._next_group = 0  # index into _group_order of the next group to read
        self._done = set(sequence[:self.pos])  # a resumed epoch: rows already taken are not read again
        self._usable_this_epoch = 0

    def _record(self, raw: int) -> tuple[dict[str, Any], _Group]:
        while raw not in self._held:
            gi = self._group_order[self._next_group]
            self._next_group += 1
            g = self.source.groups[gi]
            if all(r in self._done for r in range(g.start, g.start + g.rows)):
                continue  # taken before the resume: not read at all
            for k, record in enumerate(self.source.read_group(gi)):
                if g.start + k not in self._done:
                    self._held[g.start + k] = (record, g)
        return self._held.pop(raw)

    def take(self, k: int) -> list[Row]:
        out: list[Row] = []
        while len(out) < k:
            if self.pos >= len(self._order):
                if self._usable_this_epoch == 0 and not self._done:
                    raise ValueError(f"no usable row in a whole epoch of {self.source.files} "
                                     f"(skipped: {dict(self.source.skipped.counts)})")
                self.epoch, self.pos = self.epoch + 1, 0
                self._start_epoch()
            raw = self._order[self.pos]
            self.pos += 1
            record, group = self._record(raw)
            row = self.source.parse(raw, record, group)
            if row is not None:
                self._usable_this_epoch += 1
                out.append(row)
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    @property
    def held_rows(self) -> int:
        """Encoded rows read ahead and not taken yet (bounded by about buffer_rows + a row group)."""
        return len(self._held)


def read_deepeyes(files: list[str], cfg: DataConfig) -> DataSet:
    """Read DeepEyes-schema parquet files into validated rows; bad rows are skipped and counted.

    All rows in memory (encoded): for inspection, SFT data and tests. Training streams the same
    rows through `ParquetRows` / `RowStream` instead. The Chart file (name holding `data_v0.8`, or
    rows with data_source `chart`) is skipped unless `cfg.include_chart`. Row ids are
    `extra_info.index` when present and unique, else `file:rownum`.

    Raises:
        FileNotFoundError: a listed file does not exist.
        ValueError: a file lacks a required column (the file is not DeepEyes-schema).
    """
    source = ParquetRows(files, cfg)
    ds = DataSet(files=source.files)
    ds.rows = list(source.iter_rows(progress=True))
    ds.skipped = source.skipped.counts
    log.info("read %s", ds.summary())
    return ds
