"""Every golden file in tests/data still reads, with the values it was written with."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

from dnntrace.storage import Layout, load

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def test_golden_files_are_small_and_generated():
    golden = sorted(DATA.glob("trace_v*.arrow"))
    assert [p.name for p in golden] == ["trace_v1.arrow"]
    for p in golden:
        assert p.stat().st_size < 50_000
    first = (DATA / "make_golden.py").read_text().splitlines()[0]
    assert first.startswith("# Generator of tests/data/trace_v1.arrow")


def test_golden_v1_reads_with_its_values():
    trace = load(DATA / "trace_v1.arrow")
    assert not trace.truncated
    meta = trace.metadata
    assert meta["schema_version"] == 1 and meta["host"] == "golden"
    assert meta["created_unix_s"] == 1764172800.0
    assert trace.layout == Layout(6, -48, 64)
    assert [m["name"] for m in trace.module_tree] == ["", "fc1", "fc2"]
    assert trace.module_tree[1]["params"]["weight"] == [8, 4]
    assert trace.table.num_rows == 18  # 3 steps x (5 tensor rows + 1 loss row)
    # written before the nullable `values` column joined version 1: older files lack it, keep
    # reading, and the reader supplies it as nulls (FORMAT.md: later versions only add nullable
    # columns)
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
