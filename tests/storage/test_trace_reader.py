"""Damaged and foreign files: a torn trace yields exactly its complete batches, anything else
raises ``TraceError`` with a one-line message naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from dnntrace.storage import TraceError, TraceWriter, load, scalar_batch
from dnntrace.storage.schema import BASE_SCHEMA


def _write_batches(path, n_batches: int) -> list[int]:
    """Writes ``n_batches`` batches of i + 1 rows; returns the byte offsets where the schema
    message ends and where each batch ends (each write is flushed)."""
    w = TraceWriter(path, {"layout": {"k": 6, "emin": -48, "octaves": 64}})
    # pyarrow writes the schema message with the first batch, not when the stream opens
    ends = [w.schema.serialize().size]
    for i in range(n_batches):
        w.write(scalar_batch(i, [f"s{j}" for j in range(i + 1)], list(range(i + 1))))
        ends.append(w.bytes_written)
    w.close()
    return ends


def test_bytes_written_tracks_file_size(tmp_path):
    path = tmp_path / "t.arrow"
    ends = _write_batches(path, 3)
    assert ends == sorted(ends) and len(set(ends)) == 4
    assert os.path.getsize(path) == ends[-1] + 8  # plus the end-of-stream marker


def test_schema_is_on_disk_before_the_first_batch(tmp_path):
    path = tmp_path / "t.arrow"
    w = TraceWriter(path, {"modules": [{"name": "", "type": "Net", "depth": 0}]})
    try:
        assert load(path).metadata["modules"][0]["type"] == "Net"
    finally:
        w.close()


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9, "last_byte"])
def test_truncated_mid_batch_keeps_complete_batches(tmp_path, where):
    full = tmp_path / "full.arrow"
    ends = _write_batches(full, 5)
    data = full.read_bytes()
    for b in range(5):  # cut inside batch b: batches 0..b-1 survive
        start, end = ends[b], ends[b + 1]
        cut = end - 1 if where == "last_byte" else start + max(1, int((end - start) * where))
        path = tmp_path / f"cut{b}.arrow"
        path.write_bytes(data[:cut])
        trace = load(path)
        assert trace.truncated, f"cut at byte {cut} inside batch {b} not reported"
        assert trace.table.num_rows == b * (b + 1) // 2
        assert list(trace.steps) == list(range(b))


def test_cut_at_batch_boundary_keeps_every_batch(tmp_path):
    """A writer killed between batches leaves no end-of-stream marker; every batch reads."""
    full = tmp_path / "full.arrow"
    ends = _write_batches(full, 4)
    data = full.read_bytes()
    for b in range(5):
        path = tmp_path / f"cut{b}.arrow"
        path.write_bytes(data[: ends[b]])
        trace = load(path)
        assert trace.table.num_rows == b * (b + 1) // 2
    assert not load(full).truncated


def test_cut_inside_schema_is_an_error(tmp_path):
    full = tmp_path / "full.arrow"
    ends = _write_batches(full, 1)
    path = tmp_path / "cut.arrow"
    path.write_bytes(full.read_bytes()[: ends[0] // 2])
    _assert_trace_error(path, "not an Arrow IPC stream")


def _assert_trace_error(path, fragment: str) -> str:
    with pytest.raises(TraceError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    assert str(path) in msg
    assert fragment in msg, msg
    assert isinstance(info.value, ValueError)
    return msg


def test_missing_file(tmp_path):
    _assert_trace_error(tmp_path / "nope.arrow", "no such file")


def test_folder(tmp_path):
    _assert_trace_error(tmp_path, "folder")


def test_empty_file(tmp_path):
    p = tmp_path / "e.arrow"
    p.write_bytes(b"")
    _assert_trace_error(p, "empty")


@pytest.mark.parametrize("seed", range(4))
def test_random_bytes(tmp_path, seed):
    p = tmp_path / "r.arrow"
    p.write_bytes(np.random.default_rng(seed).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    _assert_trace_error(p, "")


def test_text_file(tmp_path):
    p = tmp_path / "t.arrow"
    p.write_text("step,loss\n0,1.0\n1,0.5\n")
    _assert_trace_error(p, "")


def test_foreign_arrow_stream(tmp_path):
    p = tmp_path / "f.arrow"
    t = pa.table({"a": [1, 2, 3]})
    with pa.OSFile(str(p), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
        w.write_table(t)
    _assert_trace_error(p, "not a dnntrace trace")


def test_arrow_file_format_is_not_a_stream(tmp_path):
    p = tmp_path / "f.arrow"
    with pa.OSFile(str(p), "wb") as f, pa.ipc.new_file(f, BASE_SCHEMA) as w:
        w.write_table(BASE_SCHEMA.empty_table())
    _assert_trace_error(p, "")


@pytest.mark.parametrize(
    "meta", [{"schema_version": 3}, {"schema_version": 0}, {"schema_version": "2"}, {}]
)
def test_unknown_schema_version(tmp_path, meta):
    p = tmp_path / "v.arrow"
    schema = BASE_SCHEMA.with_metadata({b"dnntrace": json.dumps(meta).encode()})
    with pa.OSFile(str(p), "wb") as f, pa.ipc.new_stream(f, schema):
        pass
    msg = _assert_trace_error(p, "schema version")
    assert "reads versions 1, 2" in msg


def test_metadata_not_json(tmp_path):
    p = tmp_path / "j.arrow"
    schema = BASE_SCHEMA.with_metadata({b"dnntrace": b"{not json"})
    with pa.OSFile(str(p), "wb") as f, pa.ipc.new_stream(f, schema):
        pass
    _assert_trace_error(p, "JSON")


def test_empty_trace_reads(tmp_path):
    p = tmp_path / "e.arrow"
    TraceWriter(p, {}).close()
    trace = load(p)
    assert trace.table.num_rows == 0 and not trace.truncated
    assert trace.modules == [] and trace.kinds == [] and len(trace.steps) == 0
    assert trace.anomalies() == []


def test_storage_does_not_import_torch():
    code = (
        "import sys, dnntrace, dnntrace.storage\n"
        "dnntrace.load, dnntrace.Summary, dnntrace.TraceError\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _one_weight_row() -> pa.RecordBatch:
    from dnntrace.storage import Layout, state_to_batch
    from dnntrace.storage import layout as L

    lay = Layout(2, -4, 4)  # 32 buckets
    counts = np.zeros((1, lay.width), np.int64)
    counts[0, L.HEADER + 3] = counts[0, L.HEADER + 20] = 2
    counts[0, L.COUNT] = 4
    counts[0, L.NEGATIVES] = 2
    moments = np.zeros((1, L.NUM_MOMENTS))
    moments[0, L.MIN], moments[0, L.MAX] = -1.0, 1.0
    return state_to_batch(
        counts, moments, lay, step=0, module=["m"], kind=["weight"], tensor=["weight"],
        dtype=["float32"], shape=[(4,)],
    )  # fmt: skip


def _write_raw(path, columns: dict, version: int = 2) -> None:
    """One weight row with some columns replaced, written as a trace of ``version``."""
    batch = _one_weight_row()
    names, arrays = [], []
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        if version == 1 and name == "hist_bucket":
            name, col = "hist_offset", pa.array([0], pa.int32())
        names.append(name)
        arrays.append(columns.get(name, col))
    t = pa.table(arrays, names=names)
    meta = {"schema_version": version, "layout": {"k": 2, "emin": -4, "octaves": 4}}
    schema = t.schema.with_metadata({b"dnntrace": json.dumps(meta).encode()})
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        w.write_table(t.cast(schema))


def test_a_well_formed_row_reads(tmp_path):
    _write_raw(tmp_path / "ok.arrow", {})
    s = load(tmp_path / "ok.arrow").summary("m", "weight")
    assert s.count == 4 and s.counts[16 + 3] == s.counts[16 + 20] == 2


@pytest.mark.parametrize(
    ("columns", "fragment"),
    [
        ({"hist_bucket": pa.array([[3]], pa.list_(pa.uint16()))}, "differ in length"),
        ({"hist_bucket": pa.array([[3, 32]], pa.list_(pa.uint16()))}, "outside its 32 buckets"),
        ({"hist_bucket": pa.array([[-1, 3]], pa.list_(pa.int32()))}, "outside its 32 buckets"),
        ({"k": pa.array([9], pa.int8())}, "invalid layout"),
    ],
    ids=["lengths", "past-the-end", "negative", "bad-k"],
)
def test_hostile_histogram_columns_are_one_line_errors(tmp_path, columns, fragment):
    """A bucket outside its row's layout would land in another row's or the header's counts
    when merged: the reader refuses the file instead."""
    path = tmp_path / "bad.arrow"
    _write_raw(path, columns)
    _assert_trace_error(path, fragment)


def test_a_version_1_span_outside_its_row_is_an_error(tmp_path):
    path = tmp_path / "v1.arrow"
    dense = pa.array([[1, 0, 1]], pa.list_(pa.uint32()))
    _write_raw(path, {"hist_offset": pa.array([30], pa.int32()), "hist": dense}, version=1)
    _assert_trace_error(path, "leaves its 32 buckets")
    _write_raw(path, {"hist_offset": pa.array([29], pa.int32()), "hist": dense}, version=1)
    t = load(path).table
    assert t.column("hist_bucket").to_pylist() == [[29, 31]] and "hist_offset" not in t.column_names
