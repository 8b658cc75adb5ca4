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

Range = tuple[float, float]

OVERSAMPLE = 2.0
PAD = 0.25
MAX_CELLS = 4096  # per axis
MAX_TOTAL = 1_600_000  # cells per level: bounds render time and transfer (~6 MB float32)


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
    x = _axis_window(view_x, full_x, pad)
    y = (min(view_y), max(view_y)) if fixed_y else _axis_window(view_y, full_y, pad)
    vx = (max(view_x) - min(view_x)) or 1.0
    vy = (max(view_y) - min(view_y)) or 1.0
    nx = oversample * width * (x[1] - x[0]) / vx
    ny = height if fixed_y else oversample * height * (y[1] - y[0]) / vy
    if finest_x > 0:
        nx = min(nx, (x[1] - x[0]) / finest_x)
    if nx * ny > MAX_TOTAL:
        if fixed_y:
            nx = MAX_TOTAL / ny
        else:
            s = math.sqrt(MAX_TOTAL / (nx * ny))
            nx, ny = nx * s, ny * s
    nx = min(MAX_CELLS, max(1, math.ceil(nx)))
    ny = min(MAX_CELLS, max(1, math.ceil(ny)))
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
