"""Every golden file in tests/data still reads, with the values it was written with."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pyarrow as pa
import pytest

from dnntrace.storage import Layout, load

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def test_golden_files_are_small_and_generated():
    golden = sorted(DATA.glob("trace_v*.arrow"))
    assert [p.name for p in golden] == ["trace_v1.arrow", "trace_v2.arrow"]
    for p in golden:
        assert p.stat().st_size < 50_000
    first = (DATA / "make_golden.py").read_text().splitlines()[0]
    assert first.startswith("# Generator of tests/data/trace_v2.arrow")


@pytest.mark.parametrize("version", [1, 2])
def test_golden_reads_with_its_values(version: int):
    trace = load(DATA / f"trace_v{version}.arrow")
    assert not trace.truncated
    meta = trace.metadata
    assert meta["schema_version"] == version and meta["host"] == "golden"
    assert meta["created_unix_s"] == 1764172800.0
    assert trace.layout == Layout(6, -48, 64)
    assert [m["name"] for m in trace.module_tree] == ["", "fc1", "fc2"]
    assert trace.module_tree[1]["params"]["weight"] == [8, 4]
    assert trace.table.num_rows == 18  # 3 steps x (5 tensor rows + 1 loss row)
    # v1 was written before the nullable `values` column joined version 1: older files lack it,
    # keep reading, and the reader supplies it as nulls; v2 writes it (null for tensor rows)
    assert trace.table.column("values").null_count == trace.table.num_rows
    assert list(trace.steps) == [0, 1, 2]
    assert trace.modules == ["", "fc1", "fc2"]
    assert sorted(trace.kinds) == ["activation", "scalar", "weight", "weight_grad"]

    act = trace.summary("fc2", "activation", step=2)
    assert (act.count, act.nan, act.posinf, act.neginf, act.zeros) == (32, 1, 1, 1, 13)
    assert act.sum == 32.46408665180206
    assert act.max == 2.9676859378814697 and act.min == 0.0

    w = trace.summary("fc1", "weight", step=1)
    assert (w.count, w.calls, w.nan) == (32, 1, 0)
    assert (w.min, w.max) == (-0.4999922215938568, 0.4928596019744873)
    assert w.sum == -0.4215988516807556
    assert w.quantile(0.5) == pytest.approx(-0.048110757023096085, rel=2**-7)

    loss = trace.select(module="", kind="scalar", tensor="loss")
    assert loss.column("sum").to_pylist() == [1.0, 0.5, 1.0 / 3.0]
    assert loss.column("wall_time_s").to_pylist() == [1764172800.0 + s for s in range(3)]

    bad = trace.anomalies()
    assert bad == [
        {"kind": "activation", "step": 2, "module": "fc2", "nan_count": 1, "inf_count": 2}
    ]
    merged = trace.summary("fc1", "weight")  # all steps
    assert merged.count == 96 and merged.calls == 3
    assert math.isclose(merged.mean, merged.sum / 96)
    assert np.all(np.diff(trace.quantiles("fc1", "weight", [0.5]).column("step")) > 0)


def _raw(path: pathlib.Path) -> pa.Table:
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).read_all()


def test_v1_is_read_as_the_same_rows_as_v2():
    """The two golden files hold the same rows in the two encodings of the histograms (v1: one
    dense span from ``hist_offset``; v2: the non-zero buckets and their counts); the reader
    turns v1 into v2's columns, and every column then matches."""
    raw1, raw2 = _raw(DATA / "trace_v1.arrow"), _raw(DATA / "trace_v2.arrow")
    assert "hist_offset" in raw1.column_names and "hist_bucket" not in raw1.column_names
    assert "hist_bucket" in raw2.column_names and "hist_offset" not in raw2.column_names
    # the raw v1 histograms, by hand: bucket hist_offset + j holds hist[j]
    first = raw1.column("hist_offset").to_pylist()
    dense = raw1.column("hist").to_pylist()
    want = [[(f + j, c) for j, c in enumerate(h) if c] for f, h in zip(first, dense, strict=True)]
    got = [
        list(zip(b, c, strict=True))
        for b, c in zip(
            raw2.column("hist_bucket").to_pylist(), raw2.column("hist").to_pylist(), strict=True
        )
    ]
    assert got == want and sum(map(len, got)) > 100
    t1, t2 = load(DATA / "trace_v1.arrow").table, load(DATA / "trace_v2.arrow").table
    assert t1.schema.remove_metadata() == t2.schema.remove_metadata()
    for name in t2.column_names:
        assert t1.column(name).to_pylist() == t2.column(name).to_pylist(), name
