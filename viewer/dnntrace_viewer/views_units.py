"""Views of the per-unit rows: units × steps heatmaps (Datashader over a level-of-detail
pyramid), dead and saturated units per layer, the anomaly timeline, attribution, top-k inputs.

``panels(store)`` returns ``(title, panel)`` pairs for tabs; ``store`` is a trace path, a
``Trace`` or a ``RunStore``. The heatmaps stay interactive at 10^5 units × 10^4 steps: each
zoom or pan reads at most about 4 × the screen's pixels from the pyramid (``units_data.Pyramid``,
memory-mapped from the trace's ``.units`` cache) and Datashader regrids that to the screen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import colorcet as cc
import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param

from dnntrace.storage import kinds as K

from .safe import md_escape, module_label
from .units_data import DEAD_WINDOW, SATURATED_THRESHOLD, UNIT_KINDS, Pyramid, UnitData
from .views import RunTab, _prompt_ranges

hv.extension("bokeh", logo=False)

Source = Callable[[str, str], tuple[np.ndarray, Pyramid]]  # (module, kind) -> steps, pyramid


class UnitHeatmap(param.Parameterized):
    """x = step, y = unit, colour = the statistic; redrawn at screen resolution on zoom."""

    module = param.Selector(objects=[])
    kind = param.Selector(objects=[])
    width = param.Integer(default=800)
    height = param.Integer(default=400)
    renders = param.Integer(default=0, doc="count of renders (tests)")
    binary = param.Boolean(
        default=False,
        doc="0/1 maps (dead, saturated): a fixed 0..1 colour scale, so an all-zero map is drawn "
        "as zeros, not as a single saturated colour with a '-0' colour bar",
    )

    def __init__(self, source: Source, modules: list[str], kinds: list[str], **params: Any):
        super().__init__(**params)
        self._source = source
        self.param.module.objects = modules
        self.param.kind.objects = kinds
        self.module = modules[0] if modules else None
        self.kind = kinds[0] if kinds else None
        self.range_stream = hv.streams.RangeXY()
        self.render_times: list[float] = []  # seconds per data window (bench)

    def _image(self, module: str | None, kind: str | None, x_range: Any, y_range: Any) -> hv.Image:
        t0 = time.perf_counter()
        try:
            return self._window_image(module, kind, x_range, y_range)
        finally:
            self.render_times.append(time.perf_counter() - t0)
            self.renders += 1

    def _window_image(
        self, module: str | None, kind: str | None, x_range: Any, y_range: Any
    ) -> hv.Image:
        if module is None or kind is None:
            return hv.Image(np.zeros((2, 2)))
        steps, pyr = self._source(module, kind)
        n_u, n_s = pyr.shape
        if n_u == 0 or n_s == 0:
            return hv.Image(np.zeros((2, 2)))
        s0 = float(steps[0])
        stride = float(np.median(np.diff(steps))) if len(steps) > 1 else 1.0
        if x_range is None or None in x_range:
            i0, i1 = 0.0, float(n_s)
        else:
            i0, i1 = (x_range[0] - s0) / stride + 0.5, (x_range[1] - s0) / stride + 0.5
        u0, u1 = (0.0, float(n_u)) if y_range is None or None in y_range else y_range
        a, (r0, r1, c0, c1) = pyr.window(u0, u1, i0, i1, self.height, self.width)
        # one unit or one step: two half cells, as Datashader needs two samples an axis
        a = np.repeat(a, 2, axis=0) if a.shape[0] == 1 else a
        a = np.repeat(a, 2, axis=1) if a.shape[1] == 1 else a
        xs = s0 + stride * (
            np.linspace(c0, c1, a.shape[1] + 1)[:-1] + 0.5 * (c1 - c0) / a.shape[1] - 0.5
        )
        ys = np.linspace(r0, r1, a.shape[0] + 1)[:-1] + 0.5 * (r1 - r0) / a.shape[0] - 0.5
        return hv.Image((xs, ys, a), kdims=["step", "unit"], vdims=[kind or "value"])

    def panel(self) -> pn.viewable.Viewable:
        from holoviews.operation.datashader import rasterize  # seconds of imports: on first use

        dmap = hv.DynamicMap(
            pn.bind(self._image, self.param.module, self.param.kind),
            streams=[self.range_stream],
        )
        shaded = rasterize(dmap, width=self.width, height=self.height).opts(
            cmap=cc.bmy,
            colorbar=True,
            width=self.width,
            height=self.height,
            tools=["hover"],
            active_tools=["wheel_zoom"],
            hooks=[_prompt_ranges],  # re-render at the first repaint, not after Bokeh's LOD delay
            cnorm="linear" if self.binary else "eq_hist",
            clim=(0.0, 1.0) if self.binary else (np.nan, np.nan),
            framewise=True,
        )
        return pn.Column(
            pn.Row(
                pn.widgets.Select.from_param(self.param.module, width=220),
                pn.widgets.Select.from_param(self.param.kind, width=220),
            ),
            pn.pane.HoloViews(shaded, name="unit_heatmap", css_classes=["dnt-units-heat"]),
        )


def _matrix_source(data: UnitData) -> Source:
    def source(module: str, kind: str) -> tuple[np.ndarray, Pyramid]:
        if kind in ("dead", "saturated"):
            return data.map_pyramid(module, kind)
        return data.steps(module, kind), data.pyramid(module, kind)

    return source


def _curves(
    df: pd.DataFrame, y: str, label: str, *, fraction: bool = False
) -> hv.Overlay | hv.Curve:
    if df.empty:
        return hv.Curve([], "step", y).relabel(f"{label}: no rows")
    curves = [
        # fractions get a fixed 0-1 axis: an all-zero layer sits at the bottom, not mid-plot
        hv.Curve(g, "step", y, label=m).opts(
            tools=["hover"], **({"ylim": (-0.02, 1.02)} if fraction else {})
        )
        for m, g in df.groupby("module", sort=False)
    ]
    # tall enough for its legend (one row per layer), so a legend never spills onto the next plot
    height = max(260, 22 * len(curves) + 70)
    return hv.Overlay(curves).opts(
        width=800, height=height, legend_position="right", title=label, show_legend=True
    )


def units_view(data: UnitData) -> pn.viewable.Viewable:
    kinds = [k for k in UNIT_KINDS if k in data.kinds()]
    heat = UnitHeatmap(_matrix_source(data), data.modules(K.UNIT_MEAN), kinds)
    return pn.Column(heat.panel(), name="units")


def dead_view(data: UnitData) -> pn.viewable.Viewable:
    df = data.dead_fractions()
    note = pn.pane.Markdown(
        f"A unit is **dead** when it did not fire (output > 0) at any of the last {DEAD_WINDOW} "
        f"recorded steps; **saturated** when ≥ {SATURATED_THRESHOLD:.0%} of its outputs were "
        "saturated at each of them."
    )
    heat = UnitHeatmap(
        _matrix_source(data), data.modules(K.UNIT_FIRING), ["dead", "saturated"], binary=True
    )

    def dead_text(m: str | None) -> str:
        if not m:
            return ""
        d = data.dead_units(m)
        more = f"[{', '.join(map(str, d[:50]))}, …] ({len(d)} in all)" if len(d) > 50 else d
        return f"dead units of {md_escape(module_label(m))} at the last step: {md_escape(more)}"

    dead_list = pn.pane.Markdown(pn.bind(dead_text, heat.param.module))
    return pn.Column(
        note,
        pn.pane.HoloViews(_curves(df, "dead", "dead fraction per layer", fraction=True)),
        pn.pane.HoloViews(_curves(df, "saturated", "saturated fraction per layer", fraction=True))
        if "saturated" in df
        else pn.pane.Markdown("no saturation rows"),
        heat.panel(),
        dead_list,
        name="dead",
    )


def anomaly_view(data: UnitData) -> pn.viewable.Viewable:
    an = data.anomalies()
    tl = data.nonfinite_timeline()
    curve = hv.Curve(tl, "step", "bad_values", label="NaN/Inf values per step").opts(
        width=800, height=200, tools=["hover"], color="#d62728"
    )
    if not an.empty:
        marks = hv.Overlay(
            [
                hv.VLine(float(s)).opts(color="black", line_dash="dashed")
                for s in an["step"].unique()
            ]
        )
        plot = curve * marks
        text = "; ".join(
            f"step {r.step}: **{md_escape(module_label(r.module))}** "
            f"({md_escape(r.direction)}, {md_escape(r.source)})"
            for r in an.itertuples()
        )
    else:
        plot, text = curve, "no NaN or Inf recorded"
    return pn.Column(
        pn.pane.Markdown(f"**Anomalies** — {text}", css_classes=["dnt-anomaly"]),
        pn.pane.HoloViews(plot),
        pn.pane.DataFrame(an, index=False, max_rows=50) if not an.empty else pn.pane.Markdown(""),
        name="anomalies",
    )


def attribution_view(data: UnitData) -> pn.viewable.Viewable:
    kinds: list[str] = [k for k in (K.UNIT_ATTR_ABS, K.UNIT_ATTR) if k in data.kinds()]
    heat = UnitHeatmap(_matrix_source(data), data.modules(K.UNIT_ATTR_ABS), kinds)
    tot = data.attribution_totals()
    return pn.Column(
        pn.pane.HoloViews(_curves(tot, "attr_abs", "Σ |activation × gradient| per layer")),
        heat.panel(),
        name="attribution",
    )


def topk_view(data: UnitData) -> pn.viewable.Viewable:
    mods = data.modules(K.UNIT_TOPK_VALUE)
    module = pn.widgets.Select(
        label="module", options=mods, value=mods[0] if mods else None, width=220
    )
    unit = pn.widgets.IntInput(label="unit", value=0, start=0, width=120)

    def table(m: str | None, u: int) -> pn.viewable.Viewable:
        if not m:
            return pn.pane.Markdown("no top-k rows in this trace")
        n = data.n_units(m, K.UNIT_MEAN)
        if n and not 0 <= u < n:
            return pn.pane.Markdown(f"unit must be in 0 … {n - 1}")
        return pn.pane.DataFrame(data.topk(m, u), index=False, name="topk_table")

    return pn.Column(
        pn.Row(module, unit),
        pn.pane.Markdown("Inputs that drove the unit highest (per-sample max over positions)."),
        pn.bind(table, module, unit),
        name="topk",
    )


def panels(store: Any) -> list[tuple[str, pn.viewable.Viewable]]:
    """(title, panel) for each per-unit view of ``store`` (a path, ``Trace`` or ``RunStore``)."""
    return _panels(UnitData.open(store))


def _panels(data: UnitData) -> list[tuple[str, pn.viewable.Viewable]]:
    return [
        ("Units × steps", units_view(data)),
        ("Dead / saturated", dead_view(data)),
        ("Anomalies", anomaly_view(data)),
        ("Attribution", attribution_view(data)),
        ("Top-k inputs", topk_view(data)),
    ]


class UnitsTab(RunTab):
    """The per-unit views of the store's current run."""

    title = "Units"

    rows = "has_unit_rows"

    def tabs(self) -> list[tuple[str, pn.viewable.Viewable]]:
        return _panels(UnitData.open(self.store.current.trace))
