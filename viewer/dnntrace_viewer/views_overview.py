"""Overview pieces that follow a growing run: the scalar curves (loss, learning rate, ...) and
selection widgets whose labels come from the trace.

A followed run re-reads its file every second. Rebuilding Bokeh figures on every tick left the
page holding references to models the server had already dropped ("reference ... isn't known")
and froze the curves; here the figures stay and only their data sources change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import panel as pn
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from bokeh.plotting import figure

from .data_store import RunStore


class ScalarCurves:
    """One small figure per scalar name; updated in place while the names stay the same."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.row = pn.Row(name="scalars", css_classes=["dnt-scalars"])
        self._names: tuple[str, ...] | None = None
        self._run: str | None = None
        self._sources: dict[str, ColumnDataSource] = {}
        self.updates = 0
        store.param.watch(self.update, ["run", "version"])
        self.update()

    @staticmethod
    def _data(g: Any) -> dict[str, np.ndarray]:
        v = g["value"].to_numpy(dtype=float)
        return {"step": g["step"].to_numpy(), "value": np.where(np.isfinite(v), v, np.nan)}

    def update(self, *_: Any) -> None:
        df = self.store.current.scalars()
        groups = {str(n): g.sort_values("step") for n, g in df.groupby("name")}
        names = tuple(groups)
        if names == self._names and self.store.run == self._run:
            for n, g in groups.items():
                self._sources[n].data = self._data(g)
            self.updates += 1
            return
        self._names, self._run = names, self.store.run
        if not names:
            self._sources = {}
            self.row.objects = [pn.pane.Markdown("No scalars (loss, lr) logged.")]
            return
        figs = []
        self._sources = {}
        for n, g in groups.items():
            v = g["value"].to_numpy(dtype=float)
            pos = v[np.isfinite(v)]
            log = bool(pos.size and (pos > 0).all() and pos.max() > 100 * pos.min())
            f = figure(
                width=400,
                height=170,
                title=n,  # Bokeh draws titles as text: a trace's name is never parsed as HTML
                x_axis_label="step",
                y_axis_type="log" if log else "linear",
                tools="pan,wheel_zoom,reset,save",
            )
            src = ColumnDataSource(self._data(g))
            if pos.size and pos.min() == pos.max() and pos[0] != 0:
                # a constant (a fixed learning rate): Bokeh's automatic range would be ±1 around
                # it, drawing 1e-3 as 0; show a band around the value instead
                v0 = float(pos[0])
                f.y_range = Range1d(v0 - 0.5 * abs(v0), v0 + 0.5 * abs(v0))
            f.line("step", "value", source=src, line_width=1.5)
            f.add_tools(HoverTool(tooltips=[("step", "@step"), (n, "@value{0.0000e}")]))
            self._sources[n] = src
            figs.append(pn.pane.Bokeh(f))
        self.row.objects = figs
        self.updates += 1


def linked_choice(
    store: RunStore,
    name: str,
    widget: Any,
    options: Callable[[], dict[str, Any]],
) -> Any:
    """``widget`` (a Select or MultiChoice) bound both ways to ``store.<name>``, its options
    ``{label: value}`` from ``options()`` re-read when the run or the data changes. Labels are
    the caller's: escaped for a MultiChoice (Choices.js renders labels as HTML), plain for a
    Select (Bokeh renders option text as text)."""
    busy = [False]

    def refresh(*_: Any) -> None:
        busy[0] = True
        try:
            widget.options = options()
            widget.value = getattr(store, name)
        finally:
            busy[0] = False

    def to_store(event: Any) -> None:
        if not busy[0] and getattr(store, name) != event.new:
            setattr(store, name, event.new)

    def from_store(event: Any) -> None:
        if not busy[0] and widget.value != event.new:
            busy[0] = True
            try:
                widget.value = event.new
            finally:
                busy[0] = False

    refresh()
    widget.param.watch(to_store, "value")
    store.param.watch(from_store, name)
    store.param.watch(refresh, ["run", "version"])
    return widget


__all__ = ["ScalarCurves", "linked_choice"]
