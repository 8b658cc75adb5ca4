"""Levels of detail shipped to the page: zoom and pan are drawn in the browser, the server
re-rasterises only when the level it sent no longer has the detail the view needs.

A ``Level`` is a grid of exact counts (``SeriesLOD.render``) over a window a little larger than
the view (``pad`` of its span on each side, clipped to the data) at ``oversample`` times the
screen resolution. Bokeh's image glyph zooms and pans it in the page at no server cost; the
server renders a new level only when the view leaves the level's window, when a level cell
grows past one screen pixel (zoomed in more than ``oversample`` times: the image would turn
blocky where the data has finer detail), or when cells shrink below a quarter of a pixel (zoomed
far out: the page would subsample). Measured on the 2-core VM: a zoom or pan inside a level is
one browser repaint; a new level costs one server render and one image transfer (bench/NOTES.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Range = tuple[float, float]

OVERSAMPLE = 2.0
PAD = 0.1
MAX_CELLS = 4096  # per axis
MAX_TOTAL = 1_500_000  # cells per level: bounds render, shading and transfer time


@dataclass(frozen=True)
class Level:
    """A window ``x`` x ``y`` (display coordinates) cut into ``nx`` x ``ny`` cells."""

    x: Range
    y: Range
    nx: int
    ny: int

    @property
    def cell(self) -> tuple[float, float]:
        return (self.x[1] - self.x[0]) / self.nx, (self.y[1] - self.y[0]) / self.ny


def _axis_window(view: Range, full: Range, pad: float) -> Range:
    lo, hi = min(view), max(view)
    span = hi - lo
    a, b = lo - pad * span, hi + pad * span
    # nothing to draw beyond the data: the window stops at its edge (or at the view's)
    a = max(a, min(full[0], lo))
    b = min(b, max(full[1], hi))
    return a, b


def plan(
    view_x: Range,
    view_y: Range,
    full_x: Range,
    full_y: Range,
    width: int,
    height: int,
    *,
    oversample: float = OVERSAMPLE,
    pad: float = PAD,
    fixed_y: bool = False,
    finest_x: float = 0.0,
) -> Level:
    """The level to send for a view of ``width`` x ``height`` screen pixels. ``fixed_y``: the
    y axis never zooms (the layer strips): one cell per screen pixel row over ``view_y``.
    ``finest_x``: no need for cells narrower than this (see ``covers``)."""
    vx = (max(view_x) - min(view_x)) or 1.0
    vy = (max(view_y) - min(view_y)) or 1.0
    # over budget: give up some oversampling, then the margin, never the screen resolution
    low = max(1.0, 0.75 * oversample)
    tries = [(pad, oversample), (pad, low), (0.0, low), (0.0, 1.0)]
    for p, r in tries:
        x = _axis_window(view_x, full_x, p)
        y = (min(view_y), max(view_y)) if fixed_y else _axis_window(view_y, full_y, p)
        nx = r * width * (x[1] - x[0]) / vx
        ny = height if fixed_y else r * height * (y[1] - y[0]) / vy
        if finest_x > 0:
            nx = min(nx, (x[1] - x[0]) / finest_x)
        # the budget on the cell counts sent, after rounding up (a product just under the
        # budget could pass it by a row or column of cells)
        nx = min(MAX_CELLS, max(1, math.ceil(nx)))
        ny = min(MAX_CELLS, max(1, math.ceil(ny)))
        if nx * ny <= MAX_TOTAL:
            break
    return Level(x, y, int(nx), int(ny))


def _axis_ok(level: Range, n: int, view: Range, full: Range, pixels: int, finest: float) -> bool:
    lo, hi = min(view), max(view)
    eps = 1e-9 * ((hi - lo) or 1.0)
    # each side: inside the level, or the level already reaches the data's edge there
    if lo < level[0] - eps and level[0] > full[0] + eps:
        return False
    if hi > level[1] + eps and level[1] < full[1] - eps:
        return False
    cell = (level[1] - level[0]) / n
    pixel = (hi - lo) / pixels
    too_coarse = cell > pixel * (1 + 1e-6) and cell > finest
    too_fine = cell < 0.25 * pixel
    return not (too_coarse or too_fine)


def covers(
    level: Level,
    view_x: Range,
    view_y: Range,
    full_x: Range,
    full_y: Range,
    width: int,
    height: int,
    *,
    finest_x: float = 0.0,
    fixed_y: bool = False,
) -> bool:
    """Whether ``level`` still shows ``view`` at screen resolution (see the module docstring).
    ``finest_x``: cells narrower than this (a quarter of the step spacing: the LOD spreads a
    step's values evenly over its span) show all the detail there is along x when stretched."""
    ok_x = _axis_ok(level.x, level.nx, view_x, full_x, width, finest_x)
    if fixed_y:
        return ok_x
    return ok_x and _axis_ok(level.y, level.ny, view_y, full_y, height, 0.0)


# ---- shading ----------------------------------------------------------------------------------
def palette_rgba(palette: list[str]) -> np.ndarray:
    """``#rrggbb`` colours as uint32 RGBA as Bokeh's ``image_rgba`` reads them (bytes R, G, B,
    A in memory order)."""
    rgb = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in palette], np.uint8)
    rgba = np.concatenate([rgb, np.full((len(palette), 1), 255, np.uint8)], axis=1)
    return rgba.view(np.uint32).reshape(len(palette))


def eq_hist(img: np.ndarray, nbins: int = 1 << 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram equalisation of the finite values of ``img``: (t, values, levels), ``t`` in
    [0, 1] per pixel (NaN where ``img`` is), and the values at which ``t`` reaches ``levels``
    (for a colour bar). Values are binned on ``nbins`` equal bins between their min and max,
    as Bokeh's EqHistColorMapper and Datashader's ``eq_hist`` do."""
    t = np.full(img.shape, np.nan, np.float32)
    finite = np.isfinite(img)
    v = img[finite].astype(np.float64)
    levels = np.linspace(0.0, 1.0, 5)
    if v.size == 0:
        return t, np.zeros(5), levels
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        t[finite] = 1.0
        return t, np.full(5, lo), levels
    # the equalising curve from at most ~250k of the values (a regular subsample): the same
    # curve within sampling error, at a quarter of the cost for a 1M-cell level
    sample = v[:: max(1, v.size // 250_000)]
    hist, edges = np.histogram(sample, bins=nbins, range=(lo, hi))
    cdf = np.cumsum(hist, dtype=np.float64)
    keep = hist > 0  # empty bins add nothing but interpolation error
    xs, cs = edges[1:][keep], cdf[keep]
    c0 = cs[0]
    cs = (cs - c0) / (cs[-1] - c0) if cs[-1] > c0 else np.ones_like(cs)
    t[finite] = np.interp(v, xs, cs, left=0.0)
    values = np.interp(levels, cs, xs)
    values[0] = lo
    return t, values, levels


def shade(img: np.ndarray, lut: np.ndarray, nan_rgba: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 RGBA image, counts at the colour bar's 5 levels) with eq_hist over ``img``."""
    t, values, _ = eq_hist(img)
    n = lut.size
    idx = np.clip(np.nan_to_num(t, nan=0.0) * (n - 1) + 0.5, 0, n - 1).astype(np.intp)
    out = lut[idx]
    out[~np.isfinite(img)] = nan_rgba
    return out, values
