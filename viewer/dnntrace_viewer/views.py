"""The plots. Each view reads a ``RunStore`` and redraws when its selection changes.

Histograms over time are drawn from the LOD tables (``lod.py``): every zoom or pan re-renders the
window at screen resolution by table lookups. The layer x step heatmap goes through Datashader
(``rasterize``). Hover shows exact values: the step, the value (the symlog axis inverted in the
browser), the count or statistic under the cursor.
"""

from __future__ import annotations

import math
import time
from typing import Any

import colorcet as cc
import holoviews as hv
import numpy as np
import panel as pn
import param
from bokeh.models import ColumnDataSource, CustomJSHover, FixedTicker, HoverTool, Range1d
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from .data_store import QUANTILES, STATS, RunStore
from .lod import YMap
from .safe import js_literal, md_escape, module_label, short_labels

hv.extension("bokeh", logo=False)


def warm_up() -> None:
    """Import Datashader and compile its quadmesh kernels (numba) before a user needs them."""
    import holoviews.operation.datashader as hd

    mesh = hv.QuadMesh((np.arange(4.0), np.arange(3.0), np.ones((2, 3))))
    hd.rasterize(mesh, aggregator="mean", width=8, height=8, dynamic=False)


DENSITY_CMAP = cc.fire
HEAT_CMAP = cc.bmy
BG = "#111111"


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


def _round_range(r: tuple[float, float] | None) -> tuple[float, float] | None:
    # HoloViews re-sends ranges as 5.999999999999999: round before comparing or caching
    return None if r is None else (round(float(r[0]), 9), round(float(r[1]), 9))


class HistogramOverTime(param.Parameterized):
    """x = step, y = value (symlog or linear), colour = number of values in the pixel."""

    store = param.ClassSelector(class_=RunStore)
    module = param.String(default=None, allow_None=True, doc="fixed module; None follows store")
    kind = param.String(default=None, allow_None=True, doc="fixed kind; None follows store")
    width = param.Integer(default=800)
    height = param.Integer(default=320)
    quantiles = param.Boolean(default=True)
    title = param.String(default=None, allow_None=True)
    renders = param.Integer(default=0, doc="count of renders (tests, bench)")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._last_key: tuple | None = None
        self.render_times: list[float] = []  # seconds per render (bench)
        watch = ["run", "yscale", "version"]
        if self.module is None:
            watch.append("module")
        if self.kind is None:
            watch.append("kind")
        self.range_stream = hv.streams.RangeXY()
        self.dmap = hv.DynamicMap(
            self._render,
            streams=[self.range_stream, hv.streams.Params(self.store, watch, rename={})],
        )

    def _selection(self) -> tuple[str | None, str]:
        return (
            self.module if self.module is not None else self.store.module,
            self.kind if self.kind is not None else self.store.kind,
        )

    def _render(self, x_range: Any = None, y_range: Any = None, **_: Any) -> hv.Overlay:
        t0 = time.perf_counter()
        store = self.store
        run = store.current
        module, kind = self._selection()
        ymap = run.ymap(kind, store.yscale)
        fx, fy = full_ranges(store, module, kind, ymap)
        key = (store.run, module, kind, store.yscale, store.version)
        if key != self._last_key or x_range is None or y_range is None:
            x_range, y_range = fx, fy  # a new selection starts zoomed out
        self._last_key = key
        x_range, y_range = _round_range(x_range), _round_range(y_range)
        lod = run.lod(module, kind) if module is not None else None
        w, h = self.width, self.height
        img = lod.render(x_range, y_range, w, h, ymap) if lod is not None else np.zeros((h, w))
        top = float(img.max()) if img.size else 0.0  # render() never returns NaN
        # bilinear spreading leaves tiny fractions far below one value: not data, drop them
        img = np.where(img > max(top * 1e-6, 1e-3), img, np.nan).astype(np.float32)
        if lod is None:  # no rows of this kind: an empty plot, not an all-NaN image HoloViews
            img[0, 0] = 0.0  # cannot take the range of (numpy warns "All-NaN slice")
        bounds = (x_range[0], y_range[0], x_range[1], y_range[1])
        title = self.title or f"{module or '<root>'} · {kind}"
        if lod is None:
            title += " (no rows)"
        el = hv.Image(np.flipud(img), bounds=bounds, kdims=["step", "y"], vdims=["count"])
        ticks = ymap.ticks(*y_range)
        el = el.opts(
            cmap=DENSITY_CMAP,
            cnorm="eq_hist",
            colorbar=not self.module,
            frame_width=w,
            frame_height=h,
            bgcolor=BG,
            title=title,
            framewise=True,
            xlabel="step",
            ylabel=f"value ({ymap.scale})",
            yticks=ticks or None,
            tools=["hover"],
            active_tools=["wheel_zoom"],
            default_tools=["pan", "wheel_zoom", "box_zoom", "reset", "save"],
            hover_tooltips=[("step", "$x{0}"), ("value", "$y{custom}"), ("count", "@count")],
            hover_formatters={"$y": value_formatter(ymap)},
            clipping_colors={"NaN": BG},
            hooks=[_prompt_ranges],
        )
        layers = [el]
        if self.quantiles and lod is not None and lod.steps.size:
            steps, q = run.quantile_bands(module, kind)
            for i, qv in enumerate(QUANTILES):
                name = f"q{qv * 100:g}%"
                curve = hv.Curve(
                    (steps, ymap.fwd(q[:, i]), q[:, i]), "step", ["y", "value"], label=name
                )
                dash = (
                    "solid" if 0.25 <= qv <= 0.75 else "dashed" if 0.01 <= qv <= 0.99 else "dotted"
                )
                curve = curve.opts(
                    color="#7fdbff" if qv != 0.5 else "white",
                    line_width=1.5 if qv == 0.5 else 1,
                    line_dash=dash,
                    alpha=0.7,
                    tools=["hover"],
                    show_legend=False,
                    hover_tooltips=[("quantile", name), ("step", "@step"), ("value", "@value")],
                )
                layers.append(curve)
        out = hv.Overlay(layers).opts(
            framewise=True, active_tools=["wheel_zoom"], hooks=[_prompt_ranges]
        )
        self.render_times.append(time.perf_counter() - t0)
        self.renders += 1
        return out

    def panel(self) -> pn.pane.HoloViews:
        return pn.pane.HoloViews(self.dmap, linked_axes=False, css_classes=["dnt-detail"])


class LayerStrips(param.Parameterized):
    """Small multiples in one figure: a strip per module in depth order (input at the top), each
    the module's histogram over time on the kind's shared value axis (the Glorot & Bengio 2010
    picture). Zooming in x re-renders every strip; y is fixed."""

    store = param.ClassSelector(class_=RunStore)
    width = param.Integer(default=820)
    strip_height = param.Integer(default=46)
    renders = param.Integer(default=0)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._last_key: tuple | None = None
        self.dmap = hv.DynamicMap(
            self._render,
            streams=[
                hv.streams.RangeX(),
                hv.streams.Params(self.store, ["run", "kind", "yscale", "version"]),
            ],
        )

    def _render(self, x_range: Any = None, **_: Any) -> hv.Image:
        s = self.store
        run = s.current
        kind = s.kind
        mods = [m for m in run.modules if run.lod(m, kind) is not None] or ["-"]
        ymap = run.ymap(kind, s.yscale)
        fx, fy = full_ranges(s, None, kind, ymap)
        key = (s.run, kind, s.yscale, s.version)
        if key != self._last_key or x_range is None:
            x_range = fx
        self._last_key = key
        x_range = _round_range(x_range)
        h = self.strip_height
        strips = []
        for m in mods:
            lod = run.lod(m, kind)
            img = (
                lod.render(x_range, fy, self.width, h - 2, ymap)
                if lod is not None
                else np.zeros((h - 2, self.width))
            )
            top = float(img.max()) if img.size else 0.0
            img = np.where(img > top * 1e-6, img, np.nan)
            strips.append(np.vstack([np.full((2, self.width), np.nan), np.flipud(img)]))
        data = np.vstack(strips).astype(np.float32)  # row 0 = top = first module
        n = len(mods)
        names = js_literal([module_label(m) for m in mods])
        band = fy[1] - fy[0]
        code = (
            f"const n = {names}; const i = Math.floor({n} - value);"
            "return (i >= 0 && i < n.length) ? n[i] : '';"
        )
        vcode = (
            f"const f = value - Math.floor(value); const y = {fy[0]!r} + f * {band!r};"
            + (
                f"const c = {ymap.linthresh!r};"
                "const v = Math.sign(y) * c * (Math.pow(10, Math.abs(y)) - 1);"
                if ymap.scale == "symlog"
                else "const v = y;"
            )
            + "return v.toPrecision(4);"
        )
        el = hv.Image(
            data, bounds=(x_range[0], 0, x_range[1], n), kdims=["step", "layer"], vdims=["count"]
        )
        self.renders += 1
        return el.opts(
            cmap=DENSITY_CMAP,
            cnorm="eq_hist",
            frame_width=self.width,
            frame_height=h * n,
            bgcolor=BG,
            framewise=True,
            xlabel="step",
            ylabel="",
            # long names folded (common prefix) on the axis; the hover names them in full
            yticks=[(n - i - 0.5, lab) for i, lab in enumerate(short_labels(mods))],
            title=f"{kind} of every layer, input at the top (value axis: {ymap.scale}, "
            f"{run.value_range(kind)[0]:.3g} … {run.value_range(kind)[1]:.3g})",
            tools=["hover", "xwheel_zoom", "xpan"],
            active_tools=["xwheel_zoom"],
            default_tools=["reset", "save"],
            hover_tooltips=[
                ("layer", "$y{layer}"),
                ("step", "$x{0}"),
                ("value", "$y{value}"),
                ("count", "@count"),
            ],
            hover_formatters={
                "$y{layer}": CustomJSHover(code=code),
                "$y{value}": CustomJSHover(code=vcode),
            },
            clipping_colors={"NaN": BG},
            hooks=[_prompt_ranges],
        )

    def panel(self) -> pn.pane.HoloViews:
        return pn.pane.HoloViews(self.dmap, linked_axes=False, css_classes=["dnt-strips"])


class Heatmap(param.Parameterized):
    """Layer x step heatmap of a statistic through Datashader."""

    store = param.ClassSelector(class_=RunStore)
    width = param.Integer(default=800)
    height = param.Integer(default=360)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        from holoviews.operation.datashader import rasterize  # 2 s of imports: on first use

        src = hv.DynamicMap(
            self._mesh, streams=[hv.streams.Params(self.store, ["run", "kind", "stat", "version"])]
        )
        self.dmap = rasterize(src, aggregator="mean", width=self.width, height=self.height).apply(
            self._style
        )

    def _mesh(self, **_: Any) -> hv.QuadMesh:
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
        return hv.QuadMesh((xe, ye, z), kdims=["step", "layer"], vdims=[label])

    def _style(self, el: hv.Element) -> hv.Element:
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


__all__ = ["STATS", "Distribution", "Heatmap", "HistogramOverTime", "LayerStrips"]
