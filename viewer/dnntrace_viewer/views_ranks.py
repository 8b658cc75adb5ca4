"""Views of a distributed run's rank files: rank x step and rank x layer heatmaps, stragglers, the
rank that produced a NaN first, and merged curves.

``panels(source)`` returns ``[(title, viewable), ...]`` to add as tabs; ``source`` is a folder of
rank files, a list of traces or a ``RunSet``. ``use_dask=True`` or ``scheduler="tcp://..."``
aggregates the heatmaps through Dask (``ranks_data``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param

from dnntrace.storage import kinds as K
from dnntrace.storage.runs import RunSet, open_runs

from . import ranks_data as R
from .safe import md_escape, module_label
from .views import RunTab

hv.extension("bokeh", logo=False)

GRAD_KINDS = (K.GRAD_DIVERSITY, K.GNS_B_SIMPLE, K.GNS_G2, K.GNS_TRACE_SIGMA)
_ALL = "(all modules)"


def _heatmap(arr: Any, x: str, labels: Sequence[str] | None = None) -> hv.QuadMesh:
    z = np.asarray(arr.values, dtype=float)
    ny, nx = z.shape
    xs = np.asarray(arr.coords[x].values, dtype=float) if x in arr.coords else np.arange(nx)
    xe = np.concatenate([xs - 0.5, [xs[-1] + 0.5]]) if nx else np.array([0.0, 1.0])
    ye = np.arange(ny + 1) - 0.5
    el = hv.QuadMesh((xe, ye, z), kdims=[x, "rank"], vdims=[str(arr.name)])
    opts: dict[str, Any] = {
        "cmap": "fire" if "/" not in str(arr.name) else "coolwarm",
        "colorbar": True,
        "tools": ["hover"],
        "responsive": True,
        "min_height": 320,
        "yticks": [(i, str(i)) for i in range(ny)],
        "ylabel": "rank",
    }
    if "/" in str(arr.name):
        lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        opts["clim"] = (-lim or -1.0, lim or 1.0)
    if labels is not None:
        opts["xticks"] = [(i, m or "(root)") for i, m in enumerate(labels)][: max(nx, 0)]
        opts["xrotation"] = 45
    return el.opts(**opts)


class RanksViews:
    """Widgets and plots over one ``RunSet``."""

    def __init__(
        self, runs: RunSet, *, use_dask: bool = False, scheduler: str | None = None
    ) -> None:
        self.runs = runs
        self.use_dask = use_dask
        self.scheduler = scheduler
        tensor_kinds = [k for k in runs.kinds if K.is_histogram_kind(k)]  # storage.kinds
        default = K.ACTIVATION if K.ACTIVATION in tensor_kinds else (tensor_kinds or [""])[0]
        self.run = pn.widgets.Select(label="run", options=runs.runs, value=runs.runs[0])
        self.kind = pn.widgets.Select(label="kind", options=tensor_kinds, value=default)
        self.stat = pn.widgets.Select(label="statistic", options=list(R.STATS), value="rms")
        self.module = pn.widgets.Select(label="module", options=[_ALL, *runs.modules], value=_ALL)
        self.relative = pn.widgets.Checkbox(label="relative to the mean over ranks", value=False)
        steps = runs.steps
        lo, hi = (int(steps.min()), int(steps.max())) if len(steps) else (0, 0)
        self.steps = pn.widgets.IntRangeSlider(
            label="steps", start=lo, end=max(hi, lo + 1), value=(lo, hi)
        )

    def _grid(self, x: str, **kw: Any) -> Any:
        return R.grid(
            self.runs,
            self.kind.value,
            self.stat.value,
            x=x,
            run=self.run.value,
            relative=self.relative.value,
            use_dask=self.use_dask,
            scheduler=self.scheduler,
            **kw,
        )

    def rank_step(self, *_: Any) -> Any:
        if not self.kind.value:
            return pn.pane.Markdown("No tensor rows.")
        module = None if self.module.value == _ALL else self.module.value
        return _heatmap(self._grid("step", module=module), "step")

    def rank_layer(self, *_: Any) -> Any:
        if not self.kind.value:
            return pn.pane.Markdown("No tensor rows.")
        return _heatmap(self._grid("module", steps=tuple(self.steps.value)), "module",
                        self.runs.modules)  # fmt: skip

    def health(self, *_: Any) -> Any:
        st = self.runs.step_times().to_pandas()
        st = st[st["run"] == self.run.value]
        if st.empty:
            return pn.pane.Markdown("No rank rows.")
        ranks = self.runs.ranks(self.run.value)
        steps = np.sort(st["step"].unique())
        z = np.full((max(ranks) + 1, len(steps)), np.nan)
        col = {s: i for i, s in enumerate(steps)}
        for r, s, lag in zip(st["rank"], st["step"], st["lag_s"], strict=True):
            z[int(r), col[int(s)]] = lag * 1e3
        import xarray as xr

        lag_arr = xr.DataArray(z, dims=("rank", "step"), coords={"step": steps}, name="lag_ms")
        per_rank = st.groupby("rank")["lag_s"].median().mul(1e3).rename("median lag (ms)")
        slowest = int(per_rank.idxmax())
        bad = [b for b in self.runs.first_nonfinite() if b["run"] == self.run.value]
        if bad:
            b = bad[0]
            where = md_escape(module_label(b["module"]))
            nan_md = (f"**First NaN/Inf:** rank {b['rank']} at step {b['step']}, module "
                      f"{where} ({md_escape(b['kind'])})")  # fmt: skip
        else:
            nan_md = "**No NaN or Inf** in any rank's rows."
        table = pd.DataFrame(
            [
                {"rank": b["rank"], "step": b["step"], "module": b["module"], "kind": b["kind"]}
                for b in bad
            ]  # fmt: skip
        )
        return pn.Column(
            pn.pane.Markdown(
                f"{nan_md}  \n**Slowest rank:** {slowest} (median {per_rank.max():.1f} ms behind "
                "the first rank to finish a step)",
                name="summary",
            ),
            _heatmap(lag_arr, "step").opts(title="lag behind the first rank (ms)"),
            pn.pane.DataFrame(table, index=False) if bad else pn.Spacer(),
            sizing_mode="stretch_both",
        )

    def merged(self, *_: Any) -> Any:
        module = None if self.module.value == _ALL else self.module.value
        kind = self.kind.value
        curves = []
        if kind:
            df = R.merged_curve(self.runs, kind, module, self.run.value)
            for r, g in df.groupby("rank"):
                label = "merged" if r == -1 else f"rank {r}"
                c = hv.Curve(g.sort_values("step"), "step", "rms", label=label)
                curves.append(c.opts(line_width=3 if r == -1 else 1))
        plots: list[Any] = []
        if curves:
            plots.append(hv.Overlay(curves).opts(
                title=f"rms of {kind} ({module or 'all modules'})", responsive=True,
                min_height=300, legend_position="right"))  # fmt: skip
        vec = R.vector_curves(self.runs, GRAD_KINDS, self.run.value)
        vec = vec[vec["rank"] == (vec["rank"].min() if len(vec) else 0)]
        for k, g in vec.groupby("kind"):
            plots.append(hv.Curve(g.sort_values("step"), "step", "value").opts(
                title=str(k), responsive=True, min_height=200))  # fmt: skip
        return (
            pn.Column(*plots, sizing_mode="stretch_both")
            if plots
            else pn.pane.Markdown("No rows to merge.")
        )


def panels(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | RunSet,
    *,
    use_dask: bool = False,
    scheduler: str | None = None,
) -> list[tuple[str, pn.viewable.Viewable]]:
    """Tabs for a distributed run: ``Ranks × steps``, ``Ranks × layers``, ``Stragglers & NaN``,
    ``Merged``."""
    runs = open_runs(source)
    v = RanksViews(runs, use_dask=use_dask, scheduler=scheduler)
    common = [v.run, v.kind, v.stat, v.relative]
    deps = (v.run, v.kind, v.stat, v.relative)
    return [
        (
            "Ranks × steps",
            pn.Row(
                pn.Column(*common, v.module, width=260),
                pn.panel(pn.bind(v.rank_step, *deps, v.module)),
                sizing_mode="stretch_both",
            ),
        ),  # fmt: skip
        (
            "Ranks × layers",
            pn.Row(
                pn.Column(*common, v.steps, width=260),
                pn.panel(pn.bind(v.rank_layer, *deps, v.steps)),
                sizing_mode="stretch_both",
            ),
        ),  # fmt: skip
        ("Stragglers & NaN", pn.panel(pn.bind(v.health, v.run))),
        (
            "Merged",
            pn.Row(
                pn.Column(v.run, v.kind, v.module, width=260),
                pn.panel(pn.bind(v.merged, v.run, v.kind, v.module)),
                sizing_mode="stretch_both",
            ),
        ),  # fmt: skip
    ]


class RanksTab(RunTab):
    """The rank views of a distributed run: every trace open in the store read as one
    ``RunSet`` (a folder of rank files opens as one trace per rank)."""

    title = "Ranks"
    scheduler = param.String(default=None, allow_None=True, doc="dask.distributed scheduler")

    rows = "is_distributed"

    def tabs(self) -> list[tuple[str, pn.viewable.Viewable]]:
        # the distributed traces among those open (a single-process trace is not a rank)
        paths = [r.path for r in self.store.runs.values() if r.is_distributed()]
        return panels(paths, use_dask=bool(self.scheduler), scheduler=self.scheduler)


__all__ = ["RanksTab", "RanksViews", "panels"]
