"""The page: selection widgets beside four tabs of views. No logic beyond wiring."""

from __future__ import annotations

from typing import Any

import panel as pn
from bokeh.core.validation import silence
from bokeh.core.validation.warnings import FIXED_SIZING_MODE

from dnntrace.storage import kinds as K

from . import data_store as ds
from .data_store import RunStore
from .views import (
    Distribution,
    Heatmap,
    HistogramOverTime,
    LayerStrips,
    describe,
    fmt_health,
    scalar_curves,
)

THRESHOLDS = f"""**Flags** (thresholds): **nan** any NaN/±Inf · **dead** activations
≥ {ds.DEAD_ZERO_FRACTION:.0%} zeros at the last step · **saturated** ≥ {ds.SATURATED_FRACTION:.0%}
of a Tanh/Sigmoid's outputs within {ds.SATURATION_MARGIN:.0%} of a bound at the last step ·
**vanishing / exploding** output-gradient RMS below 1/{ds.GRAD_RATIO:g} or above {ds.GRAD_RATIO:g}×
that of the module nearest the loss (median of the last 10 % of steps) · **frozen** weights' sum and
sum of squares unchanged at every step. Select a row to open the module."""

SESSION_VIEWS = "dnntrace_views"
TABS = ("Overview", "Histogram over time", "Layer × step", "Distribution at a step")

# which rows open which tab: the registry of row kinds (dnntrace.storage.kinds)
_UNIT_TAB_KINDS = {*K.UNIT_KINDS, "anomaly"}
_SPECTRAL_TAB_KINDS = set(K.SPECTRAL_KINDS) - {"filter_norm", "trajectory_pca"}


def extra_tabs(store: RunStore, scheduler: str | None = None) -> list[tuple[str, Any]]:
    """(title, builder) of the views the trace has data for: per-unit statistics, spectra and
    dynamics, ranks of a distributed run. Builders run when their tab is first opened."""
    run = store.current
    col = run.trace.table.column("kind")
    kinds = set(col.cast("string").unique().to_pylist()) if run.trace.table.num_rows else set()
    out: list[tuple[str, Any]] = []
    if kinds & _UNIT_TAB_KINDS:
        from .views_units import panels as unit_panels

        out.append(("Units", lambda: unit_panels(run.trace)))
    scalars = set(run.scalars()["name"]) if K.SCALAR_KIND in kinds else set()
    if kinds & _SPECTRAL_TAB_KINDS or any(
        n.startswith(K.SPECTRAL_SCALAR_PREFIXES) for n in scalars
    ):
        from .views_spectral import panels as spectral_panels

        out.append(("Spectra & dynamics", lambda: spectral_panels(run.path)))
    ranks = set(run.trace.table.column("rank").unique().to_pylist()) if kinds else set()
    world = int(run.trace.metadata.get("world_size") or 1)
    if world > 1 or len(ranks) > 1:
        from .views_ranks import panels as rank_panels

        paths = list(store.paths) or [run.path]
        out.append(
            ("Ranks", lambda: rank_panels(paths, use_dask=bool(scheduler), scheduler=scheduler))
        )
    return out


def build_app(
    store: RunStore, *, follow_ms: int | None = None, scheduler: str | None = None
) -> pn.viewable.Viewable:
    pn.extension("tabulator", notifications=False)
    silence(FIXED_SIZING_MODE, True)  # HoloViews layouts with frame sizes: harmless
    detail = HistogramOverTime(store=store)
    strips = LayerStrips(store=store)

    health = pn.widgets.Tabulator(
        pn.bind(
            lambda run, version: fmt_health(store.runs[run].health()),
            store.param.run,
            store.param.version,
        ),
        show_index=False,
        selectable=1,
        disabled=True,
        height=380,
        width=820,
        layout="fit_data_table",
        stylesheets=[":host .tabulator-row {cursor: pointer;}"],
    )
    tabs = pn.Tabs(dynamic=False, name="views")
    views: dict[str, Any] = {"strips": strips, "detail": detail, "tabs": tabs}

    # built when their tab first opens: Datashader's import alone costs seconds at start-up.
    heat_box = pn.Column(pn.pane.Markdown("loading…"), name="heat_box")
    dist_box = pn.Column(pn.pane.Markdown("loading…"), name="dist_box")

    extras = extra_tabs(store, scheduler)
    extra_boxes = [
        pn.Column(pn.pane.Markdown("loading…"), name=f"extra_{i}") for i in range(len(extras))
    ]

    def open_tab(event: Any) -> None:
        i = event.new - len(TABS)
        if 0 <= i < len(extras) and f"extra_{i}" not in views:
            views[f"extra_{i}"] = True
            extra_boxes[i].objects = [pn.Tabs(*extras[i][1](), dynamic=False)]
        if event.new == 2 and "heat" not in views:
            views["heat"] = Heatmap(store=store)
            heat_box.objects = [views["heat"].panel()]
        if event.new == 3 and "dist" not in views:
            views["dist"] = Distribution(store=store)
            dist_box.objects = [views["dist"].panel()]

    tabs.param.watch(open_tab, "active")

    def on_select(event: Any) -> None:
        if not event.new:
            return
        path = store.runs[store.run].health()["path"].iloc[event.new[0]]
        if path in store.param.module.objects:
            store.module = path
            tabs.active = 1

    health.param.watch(on_select, "selection")

    overview = pn.Column(
        pn.pane.Markdown(
            pn.bind(describe, store, store.param.run, store.param.version),
            css_classes=["dnt-describe"],
        ),
        pn.pane.Markdown(THRESHOLDS, width=820),
        health,
        pn.bind(scalar_curves, store, store.param.run, store.param.version),
        strips.panel(),
        name="overview",
    )
    tabs.extend(
        [
            (TABS[0], overview),
            (TABS[1], pn.Column(detail.panel(), name="detail")),
            (
                TABS[2],
                pn.Column(
                    pn.widgets.Select.from_param(store.param.stat, width=200),
                    heat_box,
                    name="heatmap",
                ),
            ),
            (
                TABS[3],
                pn.Column(
                    pn.widgets.MultiChoice.from_param(
                        store.param.overlay, label="layers overlaid", width=600
                    ),
                    pn.widgets.IntInput.from_param(
                        store.param.compare_step, label="compare with step", width=200
                    ),
                    dist_box,
                    name="distribution",
                ),
            ),
        ]
    )
    tabs.extend([(title, box) for (title, _), box in zip(extras, extra_boxes, strict=True)])
    side = pn.Column(
        pn.pane.Markdown("## dnntrace"),
        pn.widgets.Select.from_param(store.param.run, width=220),
        pn.widgets.Select.from_param(store.param.compare, label="compare run", width=220),
        pn.widgets.Select.from_param(store.param.module, width=220),
        pn.widgets.Select.from_param(store.param.kind, width=220),
        pn.widgets.RadioButtonGroup.from_param(store.param.yscale, width=220),
        pn.widgets.Checkbox.from_param(store.param.follow, label="follow the file (live)"),
        width=250,
    )
    page = pn.Row(side, tabs, name="dnntrace")
    if follow_ms:

        def tick() -> None:
            if store.follow:
                store.poll()

        pn.state.add_periodic_callback(tick, period=follow_ms)
    # the session's views, for the UI tests and the bench (render and frame counters)
    pn.state.cache.setdefault(SESSION_VIEWS, []).append(views)
    return page
