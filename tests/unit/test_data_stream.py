"""The streaming data path (issue 14): seeded epoch order over raw rows, bounded read-ahead,
exact resume, bad rows skipped and counted as they stream by, the same rows on every worker."""

from __future__ import annotations

import collections
import logging

import pyarrow.parquet as pq
import pytest

from deepeyes import data
from deepeyes.config import DataConfig
from tests.unit.test_data import _png, _record, _write


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """Two files of 40 and 23 rows in row groups of 16 (the synthetic writer's size)."""
    d = tmp_path_factory.mktemp("stream")
    return [data.write_synthetic(str(d / "a.parquet"), 40, seed=1, mix={"vstar": 1.0}),
            data.write_synthetic(str(d / "b.parquet"), 23, seed=2, mix={"thinklite_eureka": 1.0})]


def _ids(rows):
    return [r.index for r in rows]


def test_opening_reads_metadata_only_and_counts_raw_rows(files):
    src = data.ParquetRows(files, DataConfig())
    assert len(src) == 63 and [g.rows for g in src.groups] == [16, 16, 8, 16, 7]
    assert not src.skipped.counts  # nothing parsed yet
    assert _ids(src.iter_rows()) == _ids(data.read_deepeyes(files, DataConfig()).rows)


def test_every_row_once_per_epoch_in_a_seeded_order_that_resumes_exactly(files):
    src = data.ParquetRows(files, DataConfig())
    a = data.RowStream(src, seed=3, buffer_rows=8)
    first = _ids(a.take(40) + a.take(23) + a.take(30))
    by_id = {r.index: r.position for r in src.iter_rows()}
    assert sorted(first[:63]) == sorted(by_id) and len(set(first[63:])) == 30  # epoch 1, then into epoch 2
    assert first[:63] != list(by_id)  # shuffled
    assert first[63:] != first[:30]  # each epoch its own order
    b = data.RowStream(data.ParquetRows(files, DataConfig()), seed=3, buffer_rows=8)
    b.take(25)
    c = data.RowStream(data.ParquetRows(files, DataConfig()), seed=3, buffer_rows=8, **b.state())
    assert _ids(c.take(68)) == first[25:]  # a resumed run continues the order: nothing skipped or repeated
    assert _ids(data.RowStream(src, seed=4, buffer_rows=8).take(63)) != first[:63]
    assert _ids(data.RowStream(src, seed=3, shuffle=False).take(63)) == list(by_id)


def test_read_ahead_is_bounded_and_a_resume_does_not_reread_taken_groups(files, monkeypatch):
    src = data.ParquetRows(files, DataConfig())
    s = data.RowStream(src, seed=5, buffer_rows=8)
    peak = 0
    for _ in range(63):
        s.take(1)
        peak = max(peak, s.held_rows)
    assert peak <= 8 + 16  # the buffer plus one row group, never the dataset
    reads = collections.Counter()
    real = src.read_group
    monkeypatch.setattr(src, "read_group", lambda gi: reads.update([gi]) or real(gi))
    order = data.RowStream(src, seed=5, buffer_rows=8)._order
    taken_groups = {gi for gi, g in enumerate(src.groups) if all(r in set(order[:50]) for r in range(g.start, g.start + g.rows))}
    resumed = data.RowStream(src, seed=5, buffer_rows=8, epoch=0, pos=50)
    resumed.take(13)
    assert taken_groups and not (set(reads) & taken_groups) and max(reads.values()) == 1


def test_bad_rows_are_skipped_and_counted_as_they_stream_by_the_same_on_every_worker(tmp_path, caplog):
    good = _png(40, 30)
    records = [_record([good], index=f"g{i}") for i in range(6)]
    records[1] = _record([good[: len(good) // 2]])  # undecodable_image
    records[4] = _record([good], truth=None)          # missing_ground_truth
    path = _write(tmp_path / "bad.parquet", records)

    def worker():
        return data.RowStream(data.ParquetRows([path], DataConfig()), seed=0, shuffle=False)

    with caplog.at_level(logging.WARNING, logger="deepeyes.data"):
        w0, w1 = worker(), worker()
        got0 = [_ids(w0.take(2)) for _ in range(3)]
        got1 = [_ids(w1.take(2)) for _ in range(3)]
    assert got0 == got1 == [["g0", "g2"], ["g3", "g5"], ["g0", "g2"]]  # 4 usable rows, then epoch 2
    # counted once per bad row, though epoch 2 passed row 1 again
    assert w0.source.skipped.counts == {"undecodable_image": 1, "missing_ground_truth": 1}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("undecodable_image" in w for w in warned) == 2  # once per reason, on each worker


def test_schema_and_sample_checks_fail_at_once(tmp_path, files):
    table = pq.read_table(files[0]).drop_columns(["reward_model"])
    pq.write_table(table, tmp_path / "no_reward.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['reward_model'\]: not a DeepEyes-schema"):
        data.ParquetRows([files[0], str(tmp_path / "no_reward.parquet")], DataConfig())
    with pytest.raises(FileNotFoundError, match="data.train_files"):
        data.ParquetRows([str(tmp_path / "nope.parquet")], DataConfig())
    broken = _write(tmp_path / "all_bad.parquet", [_record([b"not an image"]) for _ in range(3)])
    with pytest.raises(ValueError, match="no usable row among the first 8 .* undecodable_image=3"):
        data.ParquetRows([broken], DataConfig()).sample_check()
    with pytest.raises(ValueError, match="no usable row in a whole epoch"):
        data.RowStream(data.ParquetRows([broken], DataConfig()), seed=0).take(1)
    assert data.ParquetRows(files, DataConfig()).sample_check() == {}
