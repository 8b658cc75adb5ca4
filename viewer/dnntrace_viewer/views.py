"""The plots. Each view reads a ``RunStore`` and redraws when its selection changes.

Histograms over time (the detail view and the layer strips) are plain Bokeh images of a level of
detail (``tiles.py``) rendered from the LOD tables (``lod.py``): Bokeh zooms and pans them in the
page and the server sends a new level only when the view needs more detail than the one in the
page holds. The layer x step heatmap goes through Datashader (``rasterize``). Hover shows exact
values: the step, the value (the symlog axis inverted in the browser), the count or statistic
under the cursor.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import colorcet as cc
import numpy as np
import panel as pn
import param
from bokeh.models import (
    BasicTicker,
    BasicTickFormatter,
    ColorBar,
    ColumnDataSource,
    CustomJSHover,
    CustomJSTicker,
    CustomJSTickFormatter,
    FixedTicker,
    HoverTool,
    LinearColorMapper,
    Range1d,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from . import tiles
from .data_store import QUANTILES, STATS, RunStore
from .lod import YMap
from .safe import js_literal, md_escape, module_label, short_labels


def _hv() -> Any:
    """HoloViews with its Bokeh backend, imported on first use: the first page (strips and
    histogram over time, plain Bokeh) does not need its ~1 s of imports."""
    import holoviews as hv

    hv.extension("bokeh", logo=False)
    return hv


def warm_up() -> None:
    """Import Datashader and compile its quadmesh kernels (numba) before a user needs them."""
    hv = _hv()
    import holoviews.operation.datashader as hd

    mesh = hv.QuadMesh((np.arange(4.0), np.arange(3.0), np.ones((2, 3))))
    hd.rasterize(mesh, aggregator="mean", width=8, height=8, dynamic=False)


DENSITY_CMAP = cc.fire
HEAT_CMAP = cc.bmy
BG = "#111111"
_LUT = tiles.palette_rgba(DENSITY_CMAP)
_BG_RGBA = int(tiles.palette_rgba([BG])[0])


def value_formatter(ymap: YMap) -> CustomJSHover:
    """Formats a display coordinate as the value it stands for (the inverse of ``ymap``)."""
    if ymap.scale == "linear":
        return CustomJSHover(code="return value.toPrecision(4);")
    return CustomJSHover(
        code=(
            f"const c = {ymap.linthresh!r}; const a = Math.abs(value);"
            "const v = Math.sign(value) * c * (Math.pow(10, a) - 1);"
            "return v.toPrecision(4);"
        )
    )


def full_ranges(
    store: RunStore, module: str | None, kind: str, ymap: YMap
) -> tuple[tuple[float, float], tuple[float, float]]:
    run = store.current
    steps = run.steps
    x = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5) if steps.size else (0.0, 1.0)
    lo, hi = run.value_range(kind, module)
    a, b = float(ymap.fwd(lo)), float(ymap.fwd(hi))
    pad = 0.04 * (b - a or 1.0)
    return x, (a - pad, b + pad)


def _prompt_ranges(plot: Any, element: Any) -> None:
    """Bokeh reports a zoom or pan (RangesUpdate) only when its level-of-detail period ends:
    lod_interval 300 ms + lod_timeout 500 ms by default, measured as ~1.1 s from the wheel to
    the new image here. Our images are cheap to re-render: report at the first repaint."""
    plot.state.lod_interval = 0
    plot.state.lod_timeout = 0


# symlog ticks and labels computed in the page, so a zoom or pan needs no server round trip for
# its axis (the same rule as YMap.ticks: 0 and ±powers of ten, thinned to ~12, else 5 even ticks)
_SYMLOG_TICKS = """
const a = Math.min(cb_data.start, cb_data.end), b = Math.max(cb_data.start, cb_data.end);
const fwd = (v) => Math.sign(v) * Math.log10(1 + Math.abs(v) / c);
const e0 = Math.floor(Math.log10(c)); const out = [];
for (let e = e0 + 1; e < e0 + 80; e++) {
  const y = fwd(Math.pow(10, e));
  if (y > Math.max(Math.abs(a), Math.abs(b)) + 1) break;
  out.push(y, -y);
}
let rest = out.filter((y) => y >= a && y <= b);
let step = 1;
while (rest.length / step > 12) step++;
rest = rest.filter((y, i) => Math.floor(i / 2) % step === 0);
const ticks = (a <= 0 && 0 <= b ? [0] : []).concat(rest);
if (ticks.length >= 3) return ticks;
return [0, 1, 2, 3, 4].map((i) => a + (b - a) * i / 4);
"""
_SYMLOG_LABEL = """
const v = Math.sign(tick) * c * (Math.pow(10, Math.abs(tick)) - 1);
if (v === 0) return "0";
const e = Math.round(Math.log10(Math.abs(v)));
if (Math.abs(Math.abs(v) / Math.pow(10, e) - 1) < 1e-6) {
  const s = v < 0 ? "-" : "";
  return s + (Math.abs(e) <= 1 ? String(Math.pow(10, e)) : "1e" + e);
}
return Number(v.toPrecision(3)).toString();
"""
_SYMLOG_HOVER = "const v = Math.sign(value) * c * (Math.pow(10, Math.abs(value)) - 1);"


def _set_value_axis(axis: Any, ymap: YMap) -> None:
    if ymap.scale == "symlog":
        args = {"c": ymap.linthresh}
        axis.ticker = CustomJSTicker(args=args, major_code=_SYMLOG_TICKS)
        axis.formatter = CustomJSTickFormatter(args=args, code=_SYMLOG_LABEL)
    else:
        axis.ticker = BasicTicker()
        axis.formatter = BasicTickFormatter()


def _sparse(img: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Counts as float32 with NaN where (almost) nothing is: bilinear spreading leaves tiny
    fractions far below one value there, not data; NaN draws as the background."""
    top = float(img.max()) if img.size else 0.0  # render() never returns NaN
    return np.where(img > max(top * 1e-6, floor), img, np.nan).astype(np.float32)


class _Tiled(param.Parameterized):
    """A plain Bokeh figure whose image is a ``tiles.Level`` of the data: Bokeh zooms and pans it
    in the page; the ranges' changes reach the server, which renders a new level only when
    ``tiles.covers`` says the one in the page lacks detail (no HoloViews stream, no debounce)."""

    renders = param.Integer(default=0, doc="count of levels rendered (tests, bench)")

    fixed_y = False

    def _level_figure(self, width: int, height: int, tools: str, scroll: str) -> Any:
        """The figure that shows the level: its image glyph in ``self.image``."""
        fig = figure(
            frame_width=width,
            frame_height=height,
            x_range=self.x_range,
            y_range=self.y_range,
            tools=tools,
            active_scroll=scroll,
            background_fill_color=BG,
            x_axis_label="step",
            lod_threshold=None,
        )
        fig.grid.visible = False
        self.image = fig.image_rgba(
            image="image", x="x", y="y", dw="dw", dh="dh", source=self.source
        )
        return fig

    def _init_tiles(self) -> None:
        self.level: tiles.Level | None = None
        self.level_scale = 1.0  # screen pixels per level cell (area) when the level was made
        self.render_times: list[float] = []  # seconds per level rendered (bench)
        self._pending = False
        self._quiet = False
        # "image": the level shaded on the server (eq_hist, as cnorm="eq_hist" did in the
        # page), "count": its values, for the hover
        self.source = ColumnDataSource(
            {"image": [np.zeros((1, 1), np.uint32)], "count": [np.zeros((1, 1), np.float32)]}
            | {"x": [0.0], "y": [0.0], "dw": [1.0], "dh": [1.0]}
        )
        self.bar_mapper = LinearColorMapper(palette=DENSITY_CMAP, low=0.0, high=1.0)
        self.x_range = Range1d(0.0, 1.0)
        self.y_range = Range1d(0.0, 1.0)
        for r in (self.x_range, self.y_range):
            r.on_change("start", self._on_range)
            r.on_change("end", self._on_range)

    def _full(self) -> tuple[tuple[float, float], tuple[float, float]]:
        raise NotImplementedError

    def _draw(self, level: tiles.Level) -> np.ndarray:
        """The level's counts, shape (ny, nx), row 0 at ``level.y[0]``."""
        raise NotImplementedError

    def _frame(self) -> tuple[int, int]:
        raise NotImplementedError

    def _finest_x(self) -> float:
        return 0.0

    def view(self) -> tuple[tuple[float, float], tuple[float, float]]:
        return (self.x_range.start, self.x_range.end), (self.y_range.start, self.y_range.end)

    def _soon(self, fn: Any) -> None:
        """Run ``fn`` now outside a server, else on the session's next tick: with the document
        lock held (a store change can arrive from a callback without it)."""
        doc = self.fig.document
        if doc is None or doc.session_context is None:
            fn()
        else:
            doc.add_next_tick_callback(fn)

    def _on_range(self, attr: str, old: Any, new: Any) -> None:
        if self._quiet or self._pending:
            return
        # start and end of both axes change together: look once, after this batch of events
        self._pending = True

        def later() -> None:
            self._pending = False
            self.refresh()

        self._soon(later)

    def refresh(self, force: bool = False) -> bool:
        """Send a new level if the view needs one; True if one was rendered."""
        vx, vy = self.view()
        fx, fy = self._full()
        w, h = self._frame()
        if (
            not force
            and self.level is not None
            and tiles.covers(
                self.level, vx, vy, fx, fy, w, h, finest_x=self._finest_x(), fixed_y=self.fixed_y
            )
        ):
            return False
        t0 = time.perf_counter()
        level = tiles.plan(vx, vy, fx, fy, w, h, fixed_y=self.fixed_y, finest_x=self._finest_x())
        img = self._draw(level)
        rgba, values = tiles.shade(img, _LUT, _BG_RGBA)
        # a level cell is a fraction of a screen pixel: hover and colour bar show counts per
        # screen pixel at the zoom the level was made for, as a render of the view would
        cw, ch = level.cell
        self.level_scale = float(
            ((vx[1] - vx[0]) / w / cw) * (1.0 if self.fixed_y else (vy[1] - vy[0]) / h / ch)
        )
        self.level = level
        self.bar_values = values * self.level_scale
        self.source.data = {
            "image": [rgba],
            "count": [img * np.float32(self.level_scale)],
            "x": [level.x[0]],
            "y": [level.y[0]],
            "dw": [level.x[1] - level.x[0]],
            "dh": [level.y[1] - level.y[0]],
        }
        self.render_times.append(time.perf_counter() - t0)
        self.renders += 1
        self._on_level()
        return True

    def _on_level(self) -> None:
        """Hook: a new level was sent (the colour bar's labels)."""

    def zoom_to(self, x: tuple[float, float], y: tuple[float, float]) -> bool:
        """Set both ranges as one change, as a wheel or drag in the page does (the server looks
        once per batch of range events); True if a new level was rendered."""
        self._quiet = True
        try:
            self.x_range.update(start=x[0], end=x[1])
            self.y_range.update(start=y[0], end=y[1])
        finally:
            self._quiet = False
        return self.refresh()

    def _set_view(self, x: tuple[float, float], y: tuple[float, float]) -> None:
        self._quiet = True
        try:
            self.x_range.update(start=x[0], end=x[1], reset_start=x[0], reset_end=x[1])
            self.y_range.update(start=y[0], end=y[1], reset_start=y[0], reset_end=y[1])
        finally:
            self._quiet = False


class HistogramOverTime(_Tiled):
    """x = step, y = value (symlog or linear), colour = number of values in the pixel."""

    store = param.ClassSelector(class_=RunStore)
    module = param.String(default=None, allow_None=True, doc="fixed module; None follows store")
    kind = param.String(default=None, allow_None=True, doc="fixed kind; None follows store")
    width = param.Integer(default=800)
    height = param.Integer(default=320)
    quantiles = param.Boolean(default=True)
    title = param.String(default=None, allow_None=True)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._init_tiles()
        fig = self._level_figure(
            self.width, self.height, "pan,wheel_zoom,box_zoom,reset,save", "wheel_zoom"
        )
        self.hover_value = CustomJSHover(args={"c": 1.0}, code="")
        fig.add_tools(
            HoverTool(
                renderers=[self.image],
                tooltips=[
                    ("step", "$x{0}"),
                    ("value", "$y{custom}"),
                    ("count per pixel", "@count{0,0.0}"),
                ],
                formatters={"$y": self.hover_value},
            )
        )
        self.q_sources: list[ColumnDataSource] = []
        lines = []
        for qv in QUANTILES:
            src = ColumnDataSource({"step": [], "y": [], "value": [], "q": []})
            dash = "solid" if 0.25 <= qv <= 0.75 else "dashed" if 0.01 <= qv <= 0.99 else "dotted"
            lines.append(
                fig.line(
                    "step",
                    "y",
                    source=src,
                    color="#7fdbff" if qv != 0.5 else "white",
                    line_width=1.5 if qv == 0.5 else 1,
                    line_dash=dash,
                    alpha=0.7,
                )
            )
            self.q_sources.append(src)
        fig.add_tools(
            HoverTool(
                renderers=lines,
                tooltips=[("quantile", "@q"), ("step", "@step"), ("value", "@value")],
            )
        )
        self.bar: ColorBar | None = None
        if self.module is None:
            self.bar = ColorBar(
                color_mapper=self.bar_mapper,
                width=12,
                ticker=FixedTicker(ticks=list(np.linspace(0.0, 1.0, 5))),
                title="count per pixel",
            )
            fig.add_layout(self.bar, "right")
        self.fig = fig
        self._scale: str | None = None
        watch = ["run", "yscale", "version"]
        if self.module is None:
            watch.append("module")
        if self.kind is None:
            watch.append("kind")
        self.store.param.watch(lambda *_: self._soon(self._reset), watch)
        self._reset()

    def _on_level(self) -> None:
        if self.bar is not None:  # eq_hist: the counts at 0, 1/4, ... of the colour scale
            self.bar.major_label_overrides = {
                float(t): f"{v:.3g}"
                for t, v in zip(np.linspace(0.0, 1.0, 5), self.bar_values, strict=True)
            }

    def _selection(self) -> tuple[str | None, str]:
        return (
            self.module if self.module is not None else self.store.module,
            self.kind if self.kind is not None else self.store.kind,
        )

    def _ymap(self) -> YMap:
        return self.store.current.ymap(self._selection()[1], self.store.yscale)

    def _full(self) -> tuple[tuple[float, float], tuple[float, float]]:
        module, kind = self._selection()
        return full_ranges(self.store, module, kind, self._ymap())

    def _frame(self) -> tuple[int, int]:
        return self.width, self.height

    def _finest_x(self) -> float:
        steps = self.store.current.steps
        return 0.25 * float(np.min(np.diff(steps))) if steps.size > 1 else 0.0

    def _lod(self) -> Any:
        module, kind = self._selection()
        return self.store.current.lod(module, kind) if module is not None else None

    def _draw(self, level: tiles.Level) -> np.ndarray:
        lod = self._lod()
        if lod is None:
            return np.full((level.ny, level.nx), np.nan, np.float32)
        return _sparse(lod.render(level.x, level.y, level.nx, level.ny, self._ymap()))

    def _reset(self, *_: Any) -> None:
        """A new selection: zoomed out, its quantile lines, axis and title."""
        store = self.store
        run = store.current
        module, kind = self._selection()
        ymap = self._ymap()
        lod = self._lod()
        self.fig.title.text = (self.title or f"{module or '<root>'} · {kind}") + (
            " (no rows)" if lod is None else ""
        )
        self.fig.yaxis.axis_label = f"value ({ymap.scale})"
        _set_value_axis(self.fig.yaxis[0], ymap)
        self.hover_value.code = (
            _SYMLOG_HOVER if ymap.scale == "symlog" else "const v = value;"
        ) + "return v.toPrecision(4);"
        self.hover_value.args = {"c": ymap.linthresh}
        have_q = self.quantiles and lod is not None and lod.steps.size
        if have_q:
            steps, q = run.quantile_bands(module, kind)
        for i, src in enumerate(self.q_sources):
            if have_q:
                name = f"q{QUANTILES[i] * 100:g}%"
                src.data = {
                    "step": steps,
                    "y": ymap.fwd(q[:, i]),
                    "value": q[:, i],
                    "q": [name] * len(steps),
                }
            else:
                src.data = {"step": [], "y": [], "value": [], "q": []}
        fx, fy = self._full()
        self._set_view(fx, fy)
        self.refresh(force=True)

    def panel(self) -> pn.viewable.Viewable:
        # the class on a wrapper: pn.pane.Bokeh does not put css_classes on the figure
        return pn.Column(pn.pane.Bokeh(self.fig), css_classes=["dnt-detail"])


class LayerStrips(_Tiled):
    """Small multiples in one figure: a strip per module in depth order (input at the top), each
    the module's histogram over time on the kind's shared value axis (the Glorot & Bengio 2010
    picture). Zooming and panning move along x; a new level renders every strip."""

    store = param.ClassSelector(class_=RunStore)
    width = param.Integer(default=820)
    strip_height = param.Integer(default=46)

    fixed_y = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._init_tiles()
        self.names = CustomJSHover(args={"names": [], "n": 0}, code=_LAYER_NAME)
        self.values = CustomJSHover(args={"c": 1.0, "y0": 0.0, "band": 1.0, "k": 1.0}, code="")
        fig = self._level_figure(
            self.width, self.strip_height, "xpan,xwheel_zoom,reset,save", "xwheel_zoom"
        )
        fig.add_tools(
            HoverTool(
                renderers=[self.image],
                tooltips=[
                    ("layer", "$y{layer}"),
                    ("step", "$x{0}"),
                    ("value", "$y{value}"),
                    ("count per pixel", "@count{0,0.0}"),
                ],
                formatters={"$y{layer}": self.names, "$y{value}": self.values},
            )
        )
        self.fig = fig
        self.store.param.watch(
            lambda *_: self._soon(self._reset), ["run", "kind", "yscale", "version"]
        )
        self._reset()

    def _mods(self) -> list[str]:
        run = self.store.current
        return [m for m in run.modules if run.lod(m, self.store.kind) is not None]

    def _full(self) -> tuple[tuple[float, float], tuple[float, float]]:
        x, _ = full_ranges(self.store, None, self.store.kind, self._ymap())
        return x, (0.0, float(max(len(self._mods()), 1)))

    def _ymap(self) -> YMap:
        return self.store.current.ymap(self.store.kind, self.store.yscale)

    def _frame(self) -> tuple[int, int]:
        return self.width, self.strip_height * max(len(self._mods()), 1)

    def _finest_x(self) -> float:
        steps = self.store.current.steps
        return 0.25 * float(np.min(np.diff(steps))) if steps.size > 1 else 0.0

    def _draw(self, level: tiles.Level) -> np.ndarray:
        s = self.store
        run = s.current
        ymap = self._ymap()
        _, fy = full_ranges(s, None, s.kind, ymap)
        h = self.strip_height
        strips = []
        for m in reversed(self._mods()):  # row 0 is the bottom: the last module
            img = run.lod(m, s.kind).render(level.x, fy, level.nx, h - 2, ymap)
            top = float(img.max()) if img.size else 0.0
            img = np.where(img > top * 1e-6, img, np.nan)
            strips += [img, np.full((2, level.nx), np.nan)]
        if not strips:
            return np.full((h, level.nx), np.nan, np.float32)
        return np.vstack(strips).astype(np.float32)

    def _reset(self, *_: Any) -> None:
        s = self.store
        run = s.current
        mods = self._mods()
        n = max(len(mods), 1)
        ymap = self._ymap()
        _, fy = full_ranges(s, None, s.kind, ymap)
        self.fig.frame_height = self.strip_height * n
        self.fig.yaxis.ticker = FixedTicker(ticks=[n - i - 0.5 for i in range(len(mods))])
        # names are plain text: canvas labels and tooltip values, never HTML or code
        # long names folded (common prefix) on the axis; the hover names them in full
        self.fig.yaxis.major_label_overrides = {
            n - i - 0.5: lab for i, lab in enumerate(short_labels(mods))
        }
        lo, hi = run.value_range(s.kind)
        self.fig.title.text = (
            f"{s.kind} of every layer, input at the top (value axis: {ymap.scale}, "
            f"{lo:.3g} … {hi:.3g})"
        )
        self.names.args = {"names": [module_label(m) for m in mods], "n": n}
        # a strip is h - 2 rows of image under a 2-row gap
        k = self.strip_height / (self.strip_height - 2)
        self.values.args = {"c": ymap.linthresh, "y0": fy[0], "band": fy[1] - fy[0], "k": k}
        self.values.code = (
            "const f = (value - Math.floor(value)) * k; const y = y0 + f * band;"
            + (
                "const v = Math.sign(y) * c * (Math.pow(10, Math.abs(y)) - 1);"
                if ymap.scale == "symlog"
                else "const v = y;"
            )
            + "return v.toPrecision(4);"
        )
        fx, fyy = self._full()
        self._set_view(fx, fyy)
        self.refresh(force=True)

    def panel(self) -> pn.viewable.Viewable:
        # the class on a wrapper: pn.pane.Bokeh does not put css_classes on the figure
        return pn.Column(pn.pane.Bokeh(self.fig), css_classes=["dnt-strips"])


_LAYER_NAME = (
    "const i = Math.floor(n - value); return (i >= 0 && i < names.length) ? names[i] : '';"
)


class Heatmap(param.Parameterized):
    """Layer x step heatmap of a statistic through Datashader."""

    store = param.ClassSelector(class_=RunStore)
    width = param.Integer(default=800)
    height = param.Integer(default=360)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        hv = _hv()
        from holoviews.operation.datashader import rasterize  # 2 s of imports: on first use

        src = hv.DynamicMap(
            self._mesh, streams=[hv.streams.Params(self.store, ["run", "kind", "stat", "version"])]
        )
        self.dmap = rasterize(src, aggregator="mean", width=self.width, height=self.height).apply(
            self._style
        )

    def _mesh(self, **_: Any) -> Any:
        s = self.store
        mods, steps, z = s.current.heatmap(s.stat, s.kind)
        if not mods:
            mods, steps, z = ["-"], np.array([0]), np.full((1, 1), np.nan)
        xe = np.concatenate(
            [[steps[0] - 0.5], 0.5 * (steps[:-1] + steps[1:]), [steps[-1] + 0.5]]
        ).astype(np.float64)
        ye = np.arange(len(mods) + 1, dtype=np.float64) - 0.5
        positive = s.stat in ("rms", "std", "absmax", "l2")
        if positive:
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(z > 0, np.log10(z), np.nan)
        label = f"log10 {s.stat}" if positive else s.stat
        names = js_literal([module_label(m) for m in mods])
        self._last = {"mods": mods, "label": label, "names": names}
        return _hv().QuadMesh((xe, ye, z), kdims=["step", "layer"], vdims=[label])

    def _style(self, el: Any) -> Any:
        s = self.store
        mods, label, names = (self._last[k] for k in ("mods", "label", "names"))
        layer_fmt = CustomJSHover(
            code=f"const n = {names}; const i = Math.round(value);"
            "return (i >= 0 && i < n.length) ? n[i] : '';"
        )
        return el.opts(
            cmap=HEAT_CMAP,
            colorbar=True,
            frame_width=self.width,
            frame_height=self.height,
            yticks=list(enumerate(short_labels(mods))),  # full names in the hover
            invert_yaxis=True,
            title=f"{s.kind} · {label} by layer (input at top) and step",
            framewise=True,
            tools=["hover"],
            bgcolor="#dddddd",
            ylabel="",
            hover_tooltips=[("step", "$x{0}"), ("layer", "$y{custom}"), (label, "@image")],
            hover_formatters={"$y": layer_fmt},
        )

    def panel(self) -> pn.pane.HoloViews:
        return pn.pane.HoloViews(self.dmap, linked_axes=False, css_classes=["dnt-heat"])


class Distribution(param.Parameterized):
    """Histograms of the selected step for several layers overlaid, and a second run or a
    second step for comparison; a Player animates through the steps."""

    store = param.ClassSelector(class_=RunStore)
    bins = param.Integer(default=240)
    frames = param.Integer(default=0, doc="count of frames drawn (tests, bench)")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        s = self.store
        steps = s.step_values()
        self.player = pn.widgets.Player(
            label="step",
            start=0,
            end=max(int(steps.size) - 1, 0),
            value=0,
            loop_policy="loop",
            interval=200,
            show_loop_controls=True,
            width=420,
            height=110,  # room for the loop controls: without it the plot covered them
            value_align="start",
        )
        self.speed = pn.widgets.IntSlider(
            label="frame interval (ms)", start=50, end=1000, step=50, value=200, width=200
        )
        self.speed.link(self.player, value="interval")
        self.label = pn.pane.HTML("", css_classes=["dnt-step"], width=220)
        self.fig = figure(
            width=1000,
            height=340,
            toolbar_location="right",
            tools="pan,wheel_zoom,box_zoom,reset,save",
            x_axis_label="value",
            y_axis_label="fraction of values per bin",
        )
        self.sources: list[ColumnDataSource] = []
        for i in range(12):
            src = ColumnDataSource({"x": [], "y": [], "v": []})
            dash = "dashed" if i == 11 else "solid"
            self.fig.line(
                "x",
                "y",
                source=src,
                color=Category10_10[i % 10],
                line_width=2,
                line_dash=dash,
                legend_label=f"series {i}",
                visible=False,
            )
            self.sources.append(src)
        for item in self.fig.legend[0].items:
            item.visible = False
        self.fig.legend.click_policy = "hide"
        # beside the plot, not over it: inside it covered the peaks
        self.fig.add_layout(self.fig.legend[0], "right")
        self.fig.add_tools(
            HoverTool(
                tooltips=[("series", "$name"), ("value", "@v{0.000e}"), ("fraction", "@y{0.0000}")]
            )
        )
        self.fig.y_range = Range1d(0, 1)
        self.pane = pn.Column(pn.pane.Bokeh(self.fig), css_classes=["dnt-dist"])
        self.player.param.watch(self._on_index, "value")
        s.param.watch(
            self._on_store,
            ["run", "kind", "overlay", "compare", "compare_step", "yscale", "version"],
        )
        self._on_store()

    def _on_index(self, event: Any) -> None:
        steps = self.store.step_values()
        if steps.size:
            self.store.step = int(steps[min(int(event.new), steps.size - 1)])
        self.draw()

    def _on_store(self, *_: Any) -> None:
        steps = self.store.step_values()
        self.player.end = max(int(steps.size) - 1, 0)
        self.draw(rescale=True)

    def draw(self, rescale: bool = False) -> None:
        s = self.store
        run = s.current
        kind = s.kind
        ymap = run.ymap(kind, s.yscale)
        lo, hi = run.value_range(kind)
        yr = (float(ymap.fwd(lo)), float(ymap.fwd(hi)))
        pad = 0.03 * (yr[1] - yr[0] or 1.0)
        yr = (yr[0] - pad, yr[1] + pad)
        series: list[tuple[str, np.ndarray, np.ndarray]] = []
        for m in s.overlay[:10]:
            x, f = run.distribution(m, kind, s.step, ymap, yr, self.bins)
            series.append((f"{m} @ {s.step}", x, f))
        if s.compare is not None and s.compare != s.run and s.module is not None:
            other = s.runs[s.compare]
            x, f = other.distribution(s.module, kind, s.step, ymap, yr, self.bins)
            series.append((f"{s.compare}: {s.module} @ {s.step}", x, f))
        if s.compare_step is not None and s.module is not None:
            x, f = run.distribution(s.module, kind, s.compare_step, ymap, yr, self.bins)
            series.append((f"{s.module} @ {s.compare_step}", x, f))
        items = self.fig.legend[0].items
        ymax = 0.0
        for i, src in enumerate(self.sources):
            r = self.fig.renderers[i]
            if i < len(series):
                name, x, f = series[i] if i < 10 or len(series) <= 10 else series[i]
                src.data = {"x": x, "y": f, "v": ymap.inv(x)}
                r.visible = True
                r.name = name
                items[i].label = {"value": name}
                items[i].visible = True
                ymax = max(ymax, float(f.max()) if f.size else 0.0)
            elif r.visible or items[i].visible:
                r.visible = False
                items[i].visible = False
                src.data = {"x": [], "y": [], "v": []}
        if rescale:
            self.fig.x_range.start, self.fig.x_range.end = yr
            ticks = ymap.ticks(*yr)
            if ticks:
                self.fig.xaxis.ticker = FixedTicker(ticks=[t for t, _ in ticks])
                self.fig.xaxis.major_label_overrides = {t: lab for t, lab in ticks}
            else:
                self.fig.xaxis.ticker = FixedTicker(ticks=list(np.linspace(*yr, 7)))
                self.fig.xaxis.major_label_overrides = {}
        self.fig.y_range.end = max(self.fig.y_range.end if not rescale else 0.0, ymax * 1.1 or 1.0)
        self.fig.title.text = f"{kind} distribution at step {s.step} ({ymap.scale} value axis)"
        self.label.object = f"<b>step {s.step}</b>"
        self.frames += 1

    def panel(self) -> pn.viewable.Viewable:
        return pn.Column(pn.Row(self.player, self.speed, self.label, height=120), self.pane)


class RunTab(pn.viewable.Viewer):
    """A tab of sub-tabs over the store's current run (Units, Spectra, Ranks): built the first
    time it is shown, rebuilt when the Run selector or the data (``--follow``) changes while it
    is shown, and marked stale otherwise (rebuilt when next shown). ``applies`` says whether the
    current run has the rows this tab shows; the app adds and removes the tab by it."""

    store = param.ClassSelector(class_=RunStore)
    builds = param.Integer(default=0, doc="count of builds (tests)")
    title: ClassVar[str] = ""
    rows: ClassVar[str] = ""  # the ``data_store.Run`` predicate: does the run have our rows?

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.box = pn.Column(pn.pane.Markdown("loading…"), name=type(self).__name__)
        self.shown = False
        self._built: tuple[str | None, int] | None = None
        self.store.param.watch(self._on_store, ["run", "version"])

    @classmethod
    def applies(cls, store: RunStore) -> bool:
        return bool(getattr(store.current, cls.rows)())

    def tabs(self) -> list[tuple[str, pn.viewable.Viewable]]:
        """(title, view) of each sub-tab, for the store's current run."""
        raise NotImplementedError

    def show(self, shown: bool = True) -> None:
        self.shown = shown
        if shown:
            self._build()

    def _on_store(self, *_: Any) -> None:
        if self.shown:
            self._build()

    def _build(self) -> None:
        key = (self.store.run, self.store.version)
        if key == self._built or self.store.run is None or not self.applies(self.store):
            return
        self._built = key
        self.box.objects = [pn.Tabs(*self.tabs(), dynamic=False)]
        self.builds += 1

    def __panel__(self) -> pn.viewable.Viewable:
        return self.box


def scalar_curves(store: RunStore, run: str, version: int) -> pn.viewable.Viewable:
    """Loss, learning rate and other logged scalars over the steps (plain Bokeh: a HoloViews
    layout here, next to the strips' DynamicMap, stopped every later update from reaching the
    page in Panel 1.9.4 / HoloViews 1.23.2, measured)."""
    df = store.runs[run].scalars()
    if df.empty:
        return pn.pane.Markdown("No scalars (loss, lr) logged.")
    figs = []
    for name, g in df.groupby("name"):
        v = g["value"].to_numpy(dtype=float)
        finite = np.isfinite(v)
        pos = v[finite]
        log = bool(pos.size and (pos > 0).all() and pos.max() > 100 * pos.min())
        f = figure(
            width=400,
            height=170,
            title=str(name),
            x_axis_label="step",
            y_axis_type="log" if log else "linear",
            tools="pan,wheel_zoom,reset,save",
        )
        src = ColumnDataSource({"step": g["step"].to_numpy(), "value": np.where(finite, v, np.nan)})
        f.line("step", "value", source=src, line_width=1.5)
        f.add_tools(HoverTool(tooltips=[("step", "@step"), (str(name), "@value{0.0000e}")]))
        figs.append(pn.pane.Bokeh(f))
    return pn.Row(*figs)


def describe(store: RunStore, run: str, version: int) -> str:
    r = store.runs[run]
    t = r.trace
    steps = r.steps
    lines = [
        f"### {md_escape(r.name)}",
        f"{t.table.num_rows:,} rows · {steps.size:,} steps "
        f"({int(steps[0]) if steps.size else '-'} … {int(steps[-1]) if steps.size else '-'})"
        f" · {len(r.modules)} modules · kinds: {md_escape(', '.join(r.kinds))}",
    ]
    pts = sum(float(lod.sat[-1, -1]) for lod in r.lods.values())
    lines.append(f"{pts:,.0f} (step, value) points in the histograms")
    if t.truncated:
        lines.append(
            "⚠ the file ends in a torn batch (a run killed while writing): complete batches shown"
        )
    bad = r.first_nonfinite()
    if bad is not None:
        where = md_escape(module_label(bad["module"]))
        lines.append(
            f"⚠ **first NaN/Inf: step {bad['step']}, module {where} "
            f"({md_escape(bad['kind'])}: {bad['nan_count']} NaN, {bad['inf_count']} Inf)**"
        )
    return "\n\n".join(lines)


def fmt_health(df: Any) -> Any:
    out = df[
        ["module", "type", "flags", "first_nan_step", "zero_frac", "saturation", "grad_ratio"]
    ].copy()
    out["module"] = [
        "\u2003" * max(d - 1, 0) + m for m, d in zip(df["module"], df["depth"], strict=True)
    ]
    for c in ("zero_frac", "saturation"):
        out[c] = out[c].map(lambda v: "" if v != v else f"{v:.1%}")
    out["grad_ratio"] = out["grad_ratio"].map(
        lambda v: "" if v != v or v <= 0 else f"1e{math.log10(v):+.1f}"
    )
    out["first_nan_step"] = (
        out["first_nan_step"].astype("object").where(out["first_nan_step"].notna(), "")
    )
    return out


__all__ = ["STATS", "Distribution", "Heatmap", "HistogramOverTime", "LayerStrips", "RunTab"]
