"""LOD tables: exact totals, resolution independence, quantiles, the cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnntrace.storage import layout as L
from dnntrace.storage import load
from dnntrace_viewer import lod as LD


@pytest.fixture(scope="module")
def lods(demo_trace: str) -> dict:
    return LD.build_all(load(demo_trace))


def test_series_cover_every_histogram_row(demo_trace: str, lods: dict) -> None:
    tr = load(demo_trace)
    assert ("fc0", "activation") in lods and ("act3", "activation_grad") in lods
    assert all(k != "scalar" for _, k in lods)
    s = tr.summary("fc1", "weight")  # weight + bias merged over all steps
    expected = s.count - s.nan - s.posinf - s.neginf
    assert lods[("fc1", "weight")].sat[-1, -1] == expected


def test_one_step_cell_is_that_steps_histogram(demo_trace: str, lods: dict) -> None:
    tr = load(demo_trace)
    lod = lods[("fc2", "activation")]
    i = 7
    step = int(lod.steps[i])
    summ = tr.summary("fc2", "activation", step)
    ymap = LD.YMap("symlog", 1e-3)
    # one pixel column exactly over step i, two pixel rows split at 0
    img = lod.render((step - 0.5, step + 0.5), (-30.0, 30.0), 1, 2, ymap)
    c = summ.counts
    zero_like = c[L.ZEROS] + c[L.UNDER_POS] + c[L.UNDER_NEG]
    positives = summ.hist[tr.layout.per_sign :].sum() + c[L.OVER_POS]
    assert img.sum() == pytest.approx(summ.finite)
    assert img[1, 0] == pytest.approx(positives + zero_like / 2)


@settings(max_examples=40, deadline=None)
@given(
    x0=st.floats(-5, 40),
    dx=st.floats(0.5, 45),
    y0=st.floats(-6, 5),
    dy=st.floats(0.1, 8),
    w=st.integers(1, 64),
    h=st.integers(1, 64),
)
def test_render_total_does_not_depend_on_resolution(
    lods: dict, x0: float, dx: float, y0: float, dy: float, w: int, h: int
) -> None:
    lod = lods[("act1", "activation")]
    ymap = LD.YMap("symlog", 1e-3)
    a = lod.render((x0, x0 + dx), (y0, y0 + dy), w, h, ymap)
    b = lod.render((x0, x0 + dx), (y0, y0 + dy), 2 * w + 1, 3 * h, ymap)
    assert a.shape == (h, w)
    assert (a >= 0).all()
    assert a.sum() == pytest.approx(b.sum(), rel=1e-9, abs=1e-6)


def test_quantiles_match_summary(demo_trace: str, lods: dict) -> None:
    tr = load(demo_trace)
    lod = lods[("fc3", "activation")]
    qs = np.array([0.01, 0.25, 0.5, 0.75, 0.99])
    got = lod.quantiles(qs)
    for i in (0, 20, 39):
        ref = tr.summary("fc3", "activation", int(lod.steps[i])).quantile(qs)
        # both place the quantile inside the same bucket: within one bucket width (2**-k)
        np.testing.assert_allclose(got[i], ref, rtol=2 * 2.0**-tr.layout.k, atol=1e-12)


def test_ymap_round_trip_and_ticks() -> None:
    ym = LD.YMap("symlog", 1e-4)
    v = np.array([-3e2, -1e-4, -1e-9, 0.0, 2e-7, 5e-3, 7.0])
    np.testing.assert_allclose(ym.inv(ym.fwd(v)), v, rtol=1e-12, atol=1e-20)
    assert np.all(np.diff(ym.fwd(v)) > 0)
    labels = dict((round(y, 6), s) for y, s in ym.ticks(-6, 6))
    assert labels[0.0] == "0" and "1" in labels.values() and "-1" in labels.values()
    lin = LD.YMap("linear")
    assert lin.ticks(-1, 1) == [] and lin.fwd(3.5) == 3.5


def test_cache_round_trip_and_invalidation(tmp_path, demo_trace: str) -> None:
    path = tmp_path / "t.arrow"
    with open(demo_trace, "rb") as f:
        path.write_bytes(f.read())
    tr = load(path)
    lods, cached = LD.open_lods(tr)
    assert not cached and os.path.isdir(LD.cache_dir(str(path)))
    again, cached = LD.open_lods(load(path))
    assert cached
    key = ("act2", "activation")
    np.testing.assert_array_equal(np.asarray(again[key].sat), lods[key].sat)
    np.testing.assert_array_equal(again[key].steps, lods[key].steps)
    os.utime(path, ns=(1, 1))  # a changed file: the cache no longer matches
    assert LD.load_cache(str(path)) is None


def test_a_version_1_trace_gives_the_same_lod_tables_and_each_cell_its_histogram() -> None:
    """The golden traces hold the same rows as format version 1 (dense spans, converted by the
    reader) and version 2 ((bucket, count) pairs): their LOD tables are identical, and every
    step's row of a series sums to the merged summary's finite count."""
    data = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
    t1, t2 = (load(os.path.join(data, f"trace_v{v}.arrow")) for v in (1, 2))
    a, b = LD.build_all(t1), LD.build_all(t2)
    assert a.keys() == b.keys() and ("fc1", "weight") in a
    for key in a:
        np.testing.assert_array_equal(a[key].steps, b[key].steps)
        np.testing.assert_array_equal(a[key].edges, b[key].edges)
        np.testing.assert_array_equal(a[key].sat, b[key].sat)
    lod = b[("fc2", "activation")]
    for i, step in enumerate(lod.steps.tolist()):
        s = t2.summary("fc2", "activation", step)
        assert lod.sat[i + 1, -1] - lod.sat[i, -1] == s.count - s.nan - s.posinf - s.neginf > 0
