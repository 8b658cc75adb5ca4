"""State rows -> ``state_to_batch`` -> ``TraceWriter`` -> ``load`` -> ``rows_to_summaries`` gives
back the same statistics. numpy and pyarrow only: the storage layer is tested without torch."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dnntrace.storage import (
    Layout,
    Summary,
    TraceWriter,
    load,
    rows_to_summaries,
    scalar_batch,
    state_to_batch,
)
from dnntrace.storage.schema import KINDS
from reference import tensor_summary_ref

_values = arrays(
    np.float32,
    st.integers(0, 60),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
)
_names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


@st.composite
def state_rows(draw):
    """``n`` slot rows computed by the reference from drawn values, and their labels."""
    k = draw(st.integers(0, 7))
    emin, octaves = draw(st.sampled_from([(-48, 64), (-10, 12), (-126, 254), (0, 1)]))
    lay = Layout(k, emin, octaves)
    n = draw(st.integers(1, 5))
    counts = np.zeros((n, lay.width), np.int64)
    moments = np.zeros((n, 8))
    for i in range(n):
        calls = draw(st.integers(0, 3))
        vals = np.concatenate([draw(_values) for _ in range(calls)] or [np.zeros(0, np.float32)])
        counts[i], moments[i] = tensor_summary_ref(vals, k, emin, octaves, calls=calls)
        # a compensation term, as the native kernel leaves one; the file stores sum + comp
        moments[i, 1] = draw(st.sampled_from([0.0, 1e-17, -2.5e-20]))
    labels = {
        "module": draw(st.lists(_names, min_size=n, max_size=n)),
        "kind": draw(st.lists(st.sampled_from(KINDS[:4]), min_size=n, max_size=n)),
        "tensor": draw(st.lists(_names, min_size=n, max_size=n)),
        "dtype": draw(st.lists(st.sampled_from(["float32", "bfloat16"]), min_size=n, max_size=n)),
        "shape": draw(st.lists(st.lists(st.integers(0, 9), max_size=4), min_size=n, max_size=n)),
    }
    return lay, counts, moments, labels


def assert_same_summary(got: Summary, want: Summary) -> None:
    assert got.layout == want.layout
    np.testing.assert_array_equal(got.counts, want.counts)
    assert got.sum == want.sum and got.sumsq == want.sumsq  # the file holds sum + comp
    for name in ("min", "max", "mean", "absmax"):
        a, b = getattr(got, name), getattr(want, name)
        assert a == b or (math.isnan(a) and math.isnan(b)), name


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(state_rows(), min_size=1, max_size=4))
def test_roundtrip(tmp_path, steps):
    path = tmp_path / "t.arrow"
    lay0 = steps[0][0]
    with TraceWriter(path, {"layout": lay0.to_dict()}) as w:
        for step, (lay, counts, moments, labels) in enumerate(steps):
            w.write(
                state_to_batch(counts, moments, lay, step=step, wall_time_s=1.5 * step, **labels)
            )
    trace = load(path)
    assert not trace.truncated
    assert trace.metadata["schema_version"] == 2 and trace.layout == lay0
    want_rows = sum(c.shape[0] for _, c, _, _ in steps)
    assert trace.table.num_rows == want_rows
    got = rows_to_summaries(trace.table)
    i = 0
    for step, (lay, counts, moments, labels) in enumerate(steps):
        for r in range(counts.shape[0]):
            assert_same_summary(got[i], Summary(counts[r], moments[r], lay))
            row = trace.table.slice(i, 1).to_pylist()[0]
            assert row["step"] == step and row["wall_time_s"] == 1.5 * step
            for key in ("module", "kind", "tensor", "dtype"):
                assert row[key] == labels[key][r]
            assert row["shape"] == labels["shape"][r]
            assert row["numel"] == int(np.prod(labels["shape"][r]))
            assert row["calls"] == counts[r, 10]
            i += 1
    assert list(trace.steps) == list(range(len(steps)))


def test_summary_of_rows_merges_steps(tmp_path):
    lay = Layout()
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=100).astype(np.float32) for _ in range(3)]
    path = tmp_path / "t.arrow"
    with TraceWriter(path, {}) as w:
        for step, p in enumerate(parts):
            c, m = tensor_summary_ref(p)
            w.write(
                state_to_batch(
                    c[None],
                    m[None],
                    lay,
                    step=step,
                    module=["fc"],
                    kind=["weight"],
                    tensor=["weight"],
                    dtype=["float32"],
                    shape=[(100,)],
                )
            )
    trace = load(path)
    c, m = tensor_summary_ref(np.concatenate(parts), calls=3)
    merged = trace.summary("fc", "weight")
    np.testing.assert_array_equal(merged.counts, c)
    assert merged.sum == pytest.approx(m[0], rel=1e-14)
    one = trace.summary("fc", "weight", step=1)
    np.testing.assert_array_equal(one.counts, tensor_summary_ref(parts[1])[0])
    with pytest.raises(KeyError):
        trace.summary("fc", "weight", step=7)
    qs = trace.quantiles("fc", "weight", [0.5])
    assert qs.column("step").to_pylist() == [0, 1, 2]


def test_scalar_rows(tmp_path):
    path = tmp_path / "t.arrow"
    with TraceWriter(path, {}) as w:
        w.write(scalar_batch(3, ["loss", "lr"], [0.25, math.nan]))
    t = load(path).table
    assert t.column("kind").cast(pa.string()).to_pylist() == ["scalar", "scalar"]
    assert t.column("sum").to_pylist()[0] == 0.25
    assert math.isnan(t.column("sum").to_pylist()[1])
    assert t.column("nan_count").to_pylist() == [0, 1]
    assert t.column("hist").to_pylist() == [[], []]


def test_bucket_over_uint32_refused():
    lay = Layout(0, 0, 1)
    counts = np.zeros((1, lay.width), np.int64)
    counts[0, 16] = 2**32
    with pytest.raises(OverflowError):
        state_to_batch(
            counts,
            np.zeros((1, 8)),
            lay,
            step=0,
            module=[""],
            kind=["weight"],
            tensor=[""],
            dtype=["float32"],
            shape=[()],
        )


def test_state_shape_mismatch_refused():
    with pytest.raises(ValueError, match="layout"):
        state_to_batch(
            np.zeros((1, 5), np.int64),
            np.zeros((1, 8)),
            Layout(),
            step=0,
            module=[""],
            kind=["weight"],
            tensor=[""],
            dtype=["float32"],
            shape=[()],
        )


def test_writer_reports_rows_and_bytes(tmp_path):
    path = tmp_path / "sub" / "t.arrow"  # the folder is created
    w = TraceWriter(path, {})
    w.write(scalar_batch(0, ["a"], [1.0]))
    w.write(scalar_batch(1, ["a", "b"], [1.0, 2.0]))
    w.write(scalar_batch(2, [], []))  # empty batches are not written
    rows, size = w.close()
    assert rows == 3 and w.batches == 2
    assert size == path.stat().st_size > 0
    assert w.close() == (rows, size)  # idempotent


def test_vector_rows_roundtrip(tmp_path):
    """Vector rows keep their values (float32), tensor rows get a null ``values``."""
    from dnntrace.storage.rows import vector_state

    lay = Layout()
    vecs = [np.array([0.5, -1.0, np.nan, 3.0], np.float32), np.zeros(0, np.float32)]
    counts, moments = vector_state(vecs, lay)
    assert list(counts[:, 0]) == [4, 0] and counts[0, 1] == 1
    path = tmp_path / "t.arrow"
    c, m = tensor_summary_ref(np.array([1.0, 2.0], np.float32))
    with TraceWriter(path, {}) as w:
        w.write(
            state_to_batch(
                counts,
                moments,
                lay,
                step=0,
                module=["fc", "fc"],
                kind=["unit_mean", "spectrum"],
                tensor=["", ""],
                dtype=["float32"] * 2,
                shape=[(4,), (0,)],
                values=vecs,
            )
        )
        w.write(
            state_to_batch(
                c[None],
                m[None],
                lay,
                step=0,
                module=["fc"],
                kind=["weight"],
                tensor=["weight"],
                dtype=["float32"],
                shape=[(2,)],
            )
        )
    t = load(path).table
    got = t.column("values").to_pylist()
    assert got[0][:2] == [0.5, -1.0] and math.isnan(got[0][2]) and got[0][3] == 3.0
    assert got[1] == [] and got[2] is None
    s = rows_to_summaries(t)[0]
    assert (s.count, s.nan, s.min, s.max, s.sum) == (4, 1, -1.0, 3.0, 2.5)
