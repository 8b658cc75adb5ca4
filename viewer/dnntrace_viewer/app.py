"""The page: selection widgets beside four tabs of views. No logic beyond wiring."""

from __future__ import annotations

import importlib
from typing import Any

import panel as pn
from bokeh.core.validation import silence
from bokeh.core.validation.warnings import FIXED_SIZING_MODE

from . import data_store as ds
from .data_store import RunStore
from .safe import html_text, module_label
from .views import (
    Distribution,
    Heatmap,
    HistogramOverTime,
    LayerStrips,
    describe,
    fmt_health,
)
from .views_overview import ScalarCurves, linked_choice

THRESHOLDS = f"""**Flags** (thresholds): **nan** any NaN/±Inf · **dead** activations
≥ {ds.DEAD_ZERO_FRACTION:.0%} zeros at the last step · **saturated** ≥ {ds.SATURATED_FRACTION:.0%}
of a Tanh/Sigmoid's outputs within {ds.SATURATION_MARGIN:.0%} of a bound at the last step ·
**vanishing / exploding** output-gradient RMS below 1/{ds.GRAD_RATIO:g} or above {ds.GRAD_RATIO:g}×
that of the module nearest the loss (median of the last 10 % of steps) · **frozen** weights' sum and
sum of squares unchanged at every step. Select a row to open the module."""

SESSION_VIEWS = "dnntrace_views"
TABS = ("Overview", "Histogram over time", "Layer × step", "Distribution at a step")

# the tabs after the four fixed ones: (module, ``views.RunTab`` class, its ``rows`` predicate on
# ``data_store.Run``); a module is imported when a run first has its rows (HoloViews and
# Datashader cost seconds to import)
EXTRA_TABS = (
    ("views_units", "UnitsTab", "has_unit_rows"),
    ("views_spectral", "SpectralTab", "has_spectral_rows"),
    ("views_ranks", "RanksTab", "is_distributed"),
)


class ExtraTabs:
    """The tabs after the four fixed ones: one ``RunTab`` view per kind of extra rows, on the
    store. The tabs the selected run has rows for are shown (the set changes with the Run
    selector and as a followed run grows); the open one builds or rebuilds at once, the others
    when they are next opened."""

    def __init__(self, store: RunStore, tabs: pn.Tabs, scheduler: str | None) -> None:
        self.store, self.tabs, self.scheduler = store, tabs, scheduler
        self.views: dict[str, Any] = {}  # class name -> RunTab, created on first need
        self.shown: list[Any] = []
        tabs.param.watch(self._on_active, "active")
        store.param.watch(self.sync, ["run", "version"])
        self.sync()

    @property
    def titles(self) -> list[str]:
        return [v.title for v in self.shown]

    @property
    def builds(self) -> int:
        return sum(v.builds for v in self.views.values())

    def _view(self, module: str, name: str) -> Any:
        if name not in self.views:
            cls = getattr(importlib.import_module(f"{__package__}.{module}"), name)
            extra = {"scheduler": self.scheduler} if name == "RanksTab" else {}
            self.views[name] = cls(store=self.store, **extra)
        return self.views[name]

    def sync(self, *_: Any) -> None:
        run = self.store.current
        want = [self._view(m, n) for m, n, rows in EXTRA_TABS if getattr(run, rows)()]
        if want != self.shown:
            active = self.tabs.active
            title = self.tabs._names[active] if 0 <= active < len(self.tabs) else None
            self.shown = want
            fixed = list(zip(self.tabs._names[: len(TABS)], self.tabs[: len(TABS)], strict=True))
            self.tabs[:] = [*fixed, *[(v.title, v.box) for v in want]]
            # stay on the tab of the same name when the new run has it
            if title in self.titles:
                self.tabs.active = len(TABS) + self.titles.index(title)
            elif active >= len(TABS):
                self.tabs.active = 0
        self._show(self.tabs.active)

    def _on_active(self, event: Any) -> None:
        self._show(event.new)

    def _show(self, active: int) -> None:
        i = active - len(TABS)
        for j, v in enumerate(self.shown):
            v.show(j == i)
        for v in self.views.values():
            if v not in self.shown:
                v.show(False)


HEALTH_ROW_PX, HEALTH_HEADER_PX, HEALTH_MAX_PX = 29, 29, 620  # Tabulator's rows, measured


def health_height(rows: int) -> int:
    """The health table fits its rows (a small model's table has no empty band under it and
    no hidden last row), up to a height that leaves the strips below it in view on a laptop
    screen; more rows scroll inside the table."""
    return min(HEALTH_HEADER_PX + HEALTH_ROW_PX * max(rows, 1) + 3, HEALTH_MAX_PX)


def _module_options(store: RunStore, *, html: bool) -> dict[str, Any]:
    mods = store.param.module.objects or []
    label = (lambda m: html_text(module_label(m))) if html else module_label
    return {label(m): m for m in mods}


def build_app(
    store: RunStore, *, follow_ms: int | None = None, scheduler: str | None = None
) -> pn.viewable.Viewable:
    pn.extension("tabulator", notifications=False, inline=True)
    silence(FIXED_SIZING_MODE, True)  # HoloViews layouts with frame sizes: harmless
    strips = LayerStrips(store=store)
    scalars = ScalarCurves(store)

    health = pn.widgets.Tabulator(
        fmt_health(store.current.health()),
        show_index=False,
        selectable=1,
        disabled=True,
        height=health_height(len(store.current.health())),
        width=820,
        layout="fit_data_table",
        stylesheets=[":host .tabulator-row {cursor: pointer;}"],
        css_classes=["dnt-health"],
    )

    def refresh_health(event: Any) -> None:
        health.selection = []  # a row of the previous run means nothing in this one
        h = store.current.health()
        health.param.update(value=fmt_health(h), height=health_height(len(h)))

    store.param.watch(refresh_health, ["run", "version"])
    tabs = pn.Tabs(dynamic=False, name="views")
    views: dict[str, Any] = {
        "strips": strips,
        "tabs": tabs,
        "scalars": scalars,
        "health": health,
    }

    # built when their tab first opens: the first page draws the overview alone (Datashader's
    # import alone costs seconds, and every figure built is one more for the page to lay out)
    detail_box = pn.Column(pn.pane.Markdown("loading…"), name="detail")
    heat_box = pn.Column(pn.pane.Markdown("loading…"), name="heat_box")
    dist_box = pn.Column(pn.pane.Markdown("loading…"), name="dist_box")

    def open_tab(event: Any) -> None:
        if event.new == 1 and "detail" not in views:
            views["detail"] = HistogramOverTime(store=store)
            detail_box.objects = [views["detail"].panel()]
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
        h = store.current.health()
        if event.new[0] >= len(h):
            return
        path = h["path"].iloc[event.new[0]]
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
        scalars.row,
        strips.panel(),
        name="overview",
    )
    overlay = linked_choice(
        store,
        "overlay",
        pn.widgets.MultiChoice(label="layers overlaid", width=600, css_classes=["dnt-overlay"]),
        lambda: _module_options(store, html=True),
    )
    tabs.extend(
        [
            (TABS[0], overview),
            (TABS[1], detail_box),
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
                    overlay,
                    pn.widgets.IntInput.from_param(
                        store.param.compare_step, label="compare with step", width=200
                    ),
                    dist_box,
                    name="distribution",
                ),
            ),
        ]
    )
    views["extras"] = ExtraTabs(store, tabs, scheduler)
    side = pn.Column(
        pn.pane.Markdown("## dnntrace"),
        linked_choice(
            store,
            "run",
            pn.widgets.Select(label="Run", width=220, css_classes=["dnt-run"]),
            lambda: {n: n for n in store.runs},
        ),
        linked_choice(
            store,
            "compare",
            pn.widgets.Select(label="compare run", width=220),
            lambda: {"(none)": None, **{n: n for n in store.runs}},
        ),
        linked_choice(
            store,
            "module",
            pn.widgets.Select(label="Module", width=220, css_classes=["dnt-module"]),
            lambda: _module_options(store, html=False),
        ),
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
