"""Levels of detail sent to the page: the counts they carry equal a direct Datashader
rasterisation of the same range, the colours follow the counts, and the server re-renders
exactly when the level in the page lacks the detail the view needs."""

from __future__ import annotations

import datashader as ds
import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dnntrace_viewer import tiles
from dnntrace_viewer.data_store import RunStore
from dnntrace_viewer.views import _LUT, HistogramOverTime

MAX_POINTS = 4_000_000  # sample points for the Datashader reference


def datashader_reference(
    lod, ymap, x: tuple[float, float], y: tuple[float, float], nx: int, ny: int
) -> np.ndarray:
    """Counts per pixel by Datashader from the series' own (step, value bucket) cells: each cell
    as sub x sub points spread evenly over its extent (the step's span, the bucket's extent on
    the display axis), each carrying count / sub**2, summed per pixel (ds.sum). Independent of
    ``SeriesLOD.render`` and of the levels (no summed-area table, no interpolation)."""
    sat = np.asarray(lod.sat)
    dense = np.diff(np.diff(sat, axis=0), axis=1)  # (steps, columns)
    se = lod.step_edges
    ye = ymap.fwd(lod.edges)
    si, cj = np.nonzero(dense > 0)
    near = (se[si + 1] > x[0]) & (se[si] < x[1]) & (ye[cj + 1] > y[0]) & (ye[cj] < y[1])
    si, cj = si[near], cj[near]
    sub = int(np.clip(np.sqrt(MAX_POINTS / max(si.size, 1)), 16, 256))
    f = (np.arange(sub) + 0.5) / sub
    fx, fy = (a.ravel() for a in np.meshgrid(f, f))
    xs = (se[si, None] + (se[si + 1] - se[si])[:, None] * fx[None, :]).ravel()
    ys = (ye[cj, None] + (ye[cj + 1] - ye[cj])[:, None] * fy[None, :]).ravel()
    ws = np.repeat(dense[si, cj] / sub**2, sub**2)
    df = pd.DataFrame({"x": xs, "y": ys, "w": ws})
    cvs = ds.Canvas(plot_width=nx, plot_height=ny, x_range=x, y_range=y)
    agg = cvs.points(df, "x", "y", agg=ds.sum("w")).to_numpy()  # row 0 at y[0]
    return np.nan_to_num(agg)


@pytest.mark.parametrize(
    "view",
    [
        None,  # zoomed out: the first level
        ((9.5, 25.5), (0.2, 0.5)),  # zoomed in on both axes
        ((30.5, 45.5), (-0.9, -0.6)),  # past the end of the run
    ],
)
def test_level_counts_match_datashader(demo_trace: str, view) -> None:
    store = RunStore(paths=[demo_trace])
    store.param.update(module="act1", kind="activation", yscale="linear")
    v = HistogramOverTime(store=store)
    if view is not None:
        assert v.zoom_to(*view)
    lv = v.level
    data = v.source.data
    count = np.nan_to_num(data["count"][0]) / v.level_scale  # per pixel -> per level cell
    assert count.shape == (lv.ny, lv.nx)
    assert (data["x"][0], data["y"][0]) == (lv.x[0], lv.y[0])
    assert data["dw"][0] == pytest.approx(lv.x[1] - lv.x[0])
    assert data["dh"][0] == pytest.approx(lv.y[1] - lv.y[0])
    # compare on pixels of k x k level cells (sums of exact cell integrals are exact integrals
    # over the bigger pixel), ~40 a side: the reference's sample points stay dense in each
    kx, ky = max(1, lv.nx // 40), max(1, lv.ny // 40)
    nx, ny = lv.nx // kx, lv.ny // ky
    cw, ch = lv.cell
    binned = count[: ny * ky, : nx * kx].reshape(ny, ky, nx, kx).sum(axis=(1, 3))
    run = store.current
    ref = datashader_reference(
        run.lod("act1", "activation"),
        run.ymap("activation", "linear"),
        (lv.x[0], lv.x[0] + nx * kx * cw),
        (lv.y[0], lv.y[0] + ny * ky * ch),
        nx,
        ny,
    )
    total = ref.sum()
    assert total > 100
    # per pixel: evenly spread sample points against exact areas (a shifted, flipped or
    # rescaled level is off by far more than the sampling error)
    assert np.abs(binned - ref).sum() <= 0.02 * total
    # and the comparison can tell: the same level one pixel off is far outside that
    assert np.abs(binned[:, 1:] - ref[:, :-1]).sum() > 0.1 * total
    assert np.corrcoef(binned.ravel(), ref.ravel())[0, 1] > 0.999


def test_colours_follow_counts(demo_trace: str) -> None:
    v = HistogramOverTime(store=RunStore(paths=[demo_trace]))
    count = v.source.data["count"][0]
    rgba = v.source.data["image"][0]
    ok = np.isfinite(count)
    assert ok.sum() > 1000 and (~ok).sum() > 0
    index = {int(c): i for i, c in enumerate(_LUT)}
    assert all(int(c) not in index for c in np.unique(rgba[~ok]))  # background, not a count
    idx = np.array([index[int(c)] for c in rgba[ok]])
    order = np.argsort(count[ok], kind="stable")
    assert np.all(np.diff(idx[order]) >= 0)  # eq_hist: monotone in the count
    assert idx.min() == 0 and idx.max() == _LUT.size - 1


def test_zoom_renders_a_level_only_when_needed(demo_trace: str) -> None:
    store = RunStore(paths=[demo_trace])
    v = HistogramOverTime(store=store)
    (x0, x1), (y0, y1) = v.view()
    n = v.renders
    dy = y1 - y0
    assert not v.zoom_to((x0, x1), (y0 + 0.2 * dy, y1 - 0.2 * dy))  # 1.7x: in the 2x level
    assert v.renders == n
    assert v.zoom_to((x0, x1), (y0 + 0.4 * dy, y1 - 0.4 * dy))  # 5x: cells past one pixel
    assert v.renders == n + 1
    lv = v.level
    assert not v.zoom_to((x0, x1), (y0 + 0.41 * dy, y1 - 0.39 * dy))  # a small pan inside
    assert v.renders == n + 1 and v.level == lv
    store.module = "act2"  # a new selection: zoomed out, a new level
    assert v.renders == n + 2 and v.view() != ((x0, x1), (y0 + 0.41 * dy, y1 - 0.39 * dy))


span = st.floats(0.01, 100.0)


@settings(max_examples=200, deadline=None)
@given(
    a=st.floats(-100.0, 100.0),
    w=span,
    b=st.floats(-100.0, 100.0),
    h=span,
    width=st.integers(10, 1200),
    height=st.integers(10, 600),
    zoom=st.floats(1.01, 8.0),
)
# found in CI: cell counts whose product was under the budget before rounding up, over it after
@example(a=0.0, w=1.0, b=0.0, h=20.0, width=518, height=548, zoom=2.0)
def test_plan_covers_its_view_and_zoom_past_it_does_not(
    a: float, w: float, b: float, h: float, width: int, height: int, zoom: float
) -> None:
    full_x, full_y = (-50.0, 50.0), (-20.0, 20.0)
    vx, vy = (a, a + w), (b, b + h)
    lv = tiles.plan(vx, vy, full_x, full_y, width, height)
    assert lv.nx * lv.ny <= tiles.MAX_TOTAL or min(lv.nx / width, lv.ny / height) <= 1.0 + 1e-9
    # a fresh level always covers its view: no re-render loop
    assert tiles.covers(lv, vx, vy, full_x, full_y, width, height)
    # zoomed in past the level's resolution: a new level is needed
    cx, cy = a + w / 2, b + h / 2
    ox = lv.cell[0] * width / w  # level cells per screen pixel, inverted
    oy = lv.cell[1] * height / h
    z = zoom / min(ox, oy)  # the zoom that makes one axis' cells exceed a pixel by `zoom`
    zx = (cx - w / (2 * z), cx + w / (2 * z))
    zy = (cy - h / (2 * z), cy + h / (2 * z))
    assert not tiles.covers(lv, zx, zy, full_x, full_y, width, height)


def test_pan_out_of_the_level_needs_a_new_one() -> None:
    full = (0.0, 1000.0), (-10.0, 10.0)
    lv = tiles.plan((100.0, 200.0), (-1.0, 1.0), *full, 800, 320)
    assert tiles.covers(lv, (110.0, 210.0), (-1.0, 1.0), *full, 800, 320)  # within the margin
    assert not tiles.covers(lv, (150.0, 250.0), (-1.0, 1.0), *full, 800, 320)
    # past the data's end the level stops at the data: nothing more to draw there
    end = tiles.plan((900.0, 1000.0), (-1.0, 1.0), *full, 800, 320)
    assert end.x[1] == 1000.0
    assert tiles.covers(end, (950.0, 1050.0), (-1.0, 1.0), *full, 800, 320)


def test_eq_hist_levels() -> None:
    img = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 100.0]])
    t, values, levels = tiles.eq_hist(img)
    assert np.isnan(t[0, 2])
    fin = t[np.isfinite(t)]
    assert fin.min() == 0.0 and fin.max() == 1.0
    assert np.all(np.diff(t[np.isfinite(img)][np.argsort(img[np.isfinite(img)])]) > 0)
    assert values[0] == 1.0 and values[-1] == 100.0 and list(levels) == [0, 0.25, 0.5, 0.75, 1]
