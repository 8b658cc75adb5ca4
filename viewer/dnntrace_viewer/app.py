"""The page: selection widgets beside four tabs of views. No logic beyond wiring."""

from __future__ import annotations

from typing import Any

import panel as pn
from bokeh.core.validation import silence
from bokeh.core.validation.warnings import FIXED_SIZING_MODE

from dnntrace.storage import kinds as K

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

# which rows open which tab: the registry of row kinds (dnntrace.storage.kinds)
_UNIT_TAB_KINDS = K.tab_kinds("units")
_SPECTRAL_TAB_KINDS = K.tab_kinds("spectral")


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


class ExtraTabs:
    """The tabs after the four fixed ones, for the run selected: rebuilt when the Run selector
    changes (each trace shows the tabs it has rows for), marked stale when a followed run grows
    (the open one is rebuilt at once, the others when they are next opened)."""

    def __init__(self, store: RunStore, tabs: pn.Tabs, scheduler: str | None) -> None:
        self.store, self.tabs, self.scheduler = store, tabs, scheduler
        self.entries: list[tuple[str, Any, pn.Column]] = []
        self.built: dict[int, int] = {}  # tab index -> store.version it was built at
        self.builds = 0
        self._run: str | None = None
        tabs.param.watch(self._on_active, "active")
        store.param.watch(self.sync, ["run", "version"])
        self.sync()

    @property
    def titles(self) -> list[str]:
        return [t for t, _, _ in self.entries]

    def sync(self, *_: Any) -> None:
        extras = extra_tabs(self.store, self.scheduler)
        titles = [t for t, _ in extras]
        if self.store.run != self._run or titles != self.titles:
            self._run = self.store.run
            active = self.tabs.active
            title = self.tabs._names[active] if 0 <= active < len(self.tabs) else None
            self.entries = [
                (t, b, pn.Column(pn.pane.Markdown("loading…"), name=f"extra_{i}"))
                for i, (t, b) in enumerate(extras)
            ]
            self.built = {}
            fixed = list(zip(self.tabs._names[: len(TABS)], self.tabs[: len(TABS)], strict=True))
            self.tabs[:] = [*fixed, *[(t, box) for t, _, box in self.entries]]
            # stay on the tab of the same name when the new run has it
            if title in titles:
                self.tabs.active = len(TABS) + titles.index(title)
            elif active >= len(TABS):
                self.tabs.active = 0
        else:  # same tabs, more data: their builders read the re-opened run
            boxes = [box for _, _, box in self.entries]
            self.entries = [(t, b, box) for (t, b), box in zip(extras, boxes, strict=True)]
        self._build(self.tabs.active - len(TABS))

    def _on_active(self, event: Any) -> None:
        self._build(event.new - len(TABS))

    def _build(self, i: int) -> None:
        if not 0 <= i < len(self.entries) or self.built.get(i) == self.store.version:
            return
        self.built[i] = self.store.version
        _, builder, box = self.entries[i]
        box.objects = [pn.Tabs(*builder(), dynamic=False)]
        self.builds += 1


def _module_options(store: RunStore, *, html: bool) -> dict[str, Any]:
    mods = store.param.module.objects or []
    label = (lambda m: html_text(module_label(m))) if html else module_label
    return {label(m): m for m in mods}


def build_app(
    store: RunStore, *, follow_ms: int | None = None, scheduler: str | None = None
) -> pn.viewable.Viewable:
    pn.extension("tabulator", notifications=False, inline=True)
    silence(FIXED_SIZING_MODE, True)  # HoloViews layouts with frame sizes: harmless
    detail = HistogramOverTime(store=store)
    strips = LayerStrips(store=store)
    scalars = ScalarCurves(store)

    health = pn.widgets.Tabulator(
        fmt_health(store.current.health()),
        show_index=False,
        selectable=1,
        disabled=True,
        height=380,
        width=820,
        layout="fit_data_table",
        stylesheets=[":host .tabulator-row {cursor: pointer;}"],
        css_classes=["dnt-health"],
    )

    def refresh_health(event: Any) -> None:
        health.selection = []  # a row of the previous run means nothing in this one
        health.value = fmt_health(store.current.health())

    store.param.watch(refresh_health, ["run", "version"])
    tabs = pn.Tabs(dynamic=False, name="views")
    views: dict[str, Any] = {
        "strips": strips,
        "detail": detail,
        "tabs": tabs,
        "scalars": scalars,
        "health": health,
    }

    # built when their tab first opens: Datashader's import alone costs seconds at start-up.
    heat_box = pn.Column(pn.pane.Markdown("loading…"), name="heat_box")
    dist_box = pn.Column(pn.pane.Markdown("loading…"), name="dist_box")

    def open_tab(event: Any) -> None:
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
