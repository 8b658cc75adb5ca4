"""Spectral views (issue 6): singular-value spectra over time with the power-law fit, stable rank
and alpha per layer, the update-ratio heatmap with the 1e-3 band, noise scale and Hessian
eigenvalue over time, and the trajectory animated on the loss landscape.

``panels(path_or_data)`` returns ``[(title, viewable), ...]`` for ``pn.Tabs``. Animation
callbacks only index precomputed arrays, so they finish well inside the player's interval.
"""

from __future__ import annotations

import os
from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn

from dnntrace.storage import kinds as K
from dnntrace.storage.files import landscape_path

from .safe import md_escape
from .spectral_data import SpectralData, Spectrum
from .views import RunTab

hv.extension("bokeh", logo=False)

UPDATE_BAND = (10**-3.5, 10**-2.5)  # the 1e-3 rule of thumb, half a decade either side
WIDTH = 900


def _note(text: str) -> pn.pane.Markdown:
    return pn.pane.Markdown(text, styles={"color": "#666"})


def _curves(df: pd.DataFrame, key: str, ylabel: str, *, logy: bool = False) -> hv.Overlay:
    curves = {
        name: hv.Curve(g.sort_values("step"), "step", ("value", ylabel), label=str(name))
        for name, g in df.groupby(key, sort=False)
    }
    return hv.NdOverlay(curves, kdims=[key]).opts(
        hv.opts.Curve(tools=["hover"], logy=logy, line_width=1.5),
        hv.opts.NdOverlay(
            width=WIDTH, height=300, legend_position="right", logy=logy, show_grid=True
        ),
    )


# ---- spectra ------------------------------------------------------------------------------
def esd_plot(z: Spectrum) -> hv.Overlay:
    """Log-log empirical spectral density of λ = σ², with the fitted power law over its tail."""
    lam = z.singular_values**2
    lam = lam[lam > 0]
    if lam.size < 2:
        return hv.Overlay([hv.Curve([])])
    edges = np.geomspace(lam.min(), lam.max() * (1 + 1e-9), min(60, max(8, lam.size // 4)) + 1)
    counts, _ = np.histogram(lam, edges)
    dens = counts / (lam.size * np.diff(edges))
    mid = np.sqrt(edges[:-1] * edges[1:])
    ok = dens > 0
    esd = hv.Scatter((mid[ok], dens[ok]), "λ = σ²", "density", label="ESD").opts(
        size=6, color="#1f77b4", tools=["hover"]
    )
    parts = [esd]
    if np.isfinite(z.alpha) and z.n_tail:
        x = np.geomspace(z.xmin, lam.max(), 50)
        frac = z.n_tail / lam.size
        pl = frac * (z.alpha - 1) / z.xmin * (x / z.xmin) ** (-z.alpha)
        parts.append(
            hv.Curve((x, pl), "λ = σ²", "density", label=f"power law α={z.alpha:.2f}").opts(
                color="#d62728", line_width=2
            )
        )
        parts.append(hv.VLine(z.xmin).opts(color="#999", line_dash="dashed"))
    if np.isfinite(z.alpha):
        title = (
            f"{z.layer} at step {z.source_step}: α = {z.alpha:.2f}, KS = {z.ks_distance:.3f}, "
            f"{z.n_tail}/{lam.size} eigenvalues in the tail"
        )
    else:  # the fit needs a tail of enough eigenvalues (Clauset et al. 2009)
        title = (
            f"{z.layer} at step {z.source_step}: no power-law fit "
            f"({z.n_tail}/{lam.size} eigenvalues in the tail: too few)"
        )
    # framewise: the axes follow each spectrum as the layer or the step changes
    return hv.Overlay(parts).opts(
        hv.opts.Scatter(framewise=True),
        hv.opts.Curve(framewise=True),
        hv.opts.Overlay(
            logx=True,
            logy=True,
            width=WIDTH,
            height=380,
            title=title,
            legend_position="top_right",
            framewise=True,
        ),
    )


class SpectraView:
    """A layer selector and a player over the steps with full spectra."""

    def __init__(self, data: SpectralData) -> None:
        self.data = data
        by_layer: dict[str, list[Spectrum]] = {}
        for z in data.spectra:
            by_layer.setdefault(z.layer, []).append(z)
        self.by_layer = by_layer
        layers = list(by_layer)
        # open on a spectrum that has a power-law fit: the first layer with one, its last one
        fitted = [m for m in layers if any(np.isfinite(z.alpha) for z in by_layer[m])]
        first = fitted[0] if fitted else layers[0]
        last = max(
            (i for i, z in enumerate(by_layer[first]) if np.isfinite(z.alpha)),
            default=len(by_layer[first]) - 1,
        )
        self.layer = pn.widgets.Select(label="layer", options=layers, value=first, width=260)
        n = max(len(v) for v in by_layer.values())
        self.player = pn.widgets.Player(
            label="spectrum",
            start=0,
            end=max(n - 1, 0),
            value=last,
            interval=700,
            loop_policy="loop",
            width=400,
        )
        self.plot = hv.DynamicMap(pn.bind(self._plot, layer=self.layer, i=self.player))

    def _plot(self, layer: str, i: int) -> hv.Overlay:
        zs = self.by_layer[layer]
        return esd_plot(zs[min(i, len(zs) - 1)])

    def panel(self) -> pn.viewable.Viewable:
        esd = self.data.esd_table()
        alpha = _curves(esd.rename(columns={"alpha": "value"}), "layer", "power-law α")
        sr = self.data.layer_series(K.STABLE_RANK)
        skipped = sorted(int(s) for s in self.data.scalars(["spectrum/skipped"])["step"])
        return pn.Column(
            pn.Row(self.layer, self.player),
            pn.pane.HoloViews(self.plot, name="esd"),
            *(
                [
                    _note(
                        (
                            f"{len(skipped)} full spectra were skipped (steps "
                            if len(skipped) > 1
                            else "1 full spectrum was skipped (step "
                        )
                        + ", ".join(map(str, skipped[:8]))
                        + (", …" if len(skipped) > 8 else "")
                        + "): each was due while the previous one was still being computed in "
                        "the background. A larger `full_every` gives every one."
                    )
                ]
                if skipped
                else []
            ),
            pn.pane.Markdown(
                "**Power-law α of each layer's ESD** (Martin & Mahoney: 2-6 is "
                "typical of trained layers)"
            ),
            pn.pane.HoloViews(alpha.opts(title="alpha over time"), name="alpha")
            if np.isfinite(esd["alpha"]).any()
            else _note("No power-law fit yet: every spectrum has too few eigenvalues in its tail."),
            pn.pane.HoloViews(
                _curves(sr, "layer", "stable rank").opts(title="stable rank ‖W‖F²/σ₁²")
                if len(sr)
                else hv.Curve([]),
                name="stable_rank",
            ),
        )


def layers_panel(data: SpectralData) -> pn.viewable.Viewable:
    parts: list[Any] = []
    for kind, label in ((K.SIGMA_MAX, "σ_max"), (K.STABLE_RANK, "stable rank")):
        df = data.layer_series(kind)
        if len(df):
            parts.append(
                pn.pane.HoloViews(_curves(df, "layer", label).opts(title=label), name=kind)
            )
    rk = data.rankme()
    if len(rk):
        parts.append(
            pn.pane.HoloViews(
                _curves(rk, "layer", "RankMe").opts(title="effective rank of features (RankMe)"),
                name="rankme",
            )
        )
    return pn.Column(*parts) if parts else _note("No per-layer spectral rows in this trace.")


# ---- update ratios ------------------------------------------------------------------------
def update_ratio_panel(data: SpectralData, max_steps: int = 400) -> pn.viewable.Viewable:
    df = data.layer_series(K.UPDATE_RATIO)
    if not len(df):
        return _note("No `update_ratio` rows (enable with `dynamics=True`).")
    steps = np.sort(df["step"].unique())
    if steps.size > max_steps:  # bin steps: median per bin keeps the heatmap light
        edges = np.linspace(steps[0], steps[-1] + 1, max_steps + 1)
        df = df.assign(step=edges[np.searchsorted(edges, df["step"], side="right") - 1].astype(int))
        df = df.groupby(["step", "layer"], as_index=False)["value"].median()
    df = df.assign(log10_ratio=np.log10(df["value"].clip(lower=1e-12)))
    layers = list(dict.fromkeys(data.layer_series(K.UPDATE_RATIO)["layer"]))
    heat = hv.HeatMap(df, ["step", "layer"], "log10_ratio").opts(
        cmap="RdBu_r",
        clim=(-5, -1),
        colorbar=True,
        width=WIDTH,
        height=max(250, 18 * len(layers)),
        tools=["hover"],
        title="log10 ‖ΔW‖/‖W‖ per layer and step (white = 1e-3)",
        invert_yaxis=True,
        xlabel="step",
        ylabel="",
    )
    band = hv.HSpan(*UPDATE_BAND).opts(color="#2ca02c", alpha=0.15)
    curves = _curves(df, "layer", "‖ΔW‖/‖W‖", logy=True)
    # the first update (from an initialisation near zero, or Adam's first step) can be 10^20
    # times the rest: the axis spans the 1st-99th percentile, widened to whole decades
    v = df["value"].to_numpy(dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    ylim = (
        (
            10.0 ** np.floor(np.log10(min(np.percentile(v, 1), UPDATE_BAND[0]))),
            10.0 ** np.ceil(np.log10(max(np.percentile(v, 99), UPDATE_BAND[1]))),
        )
        if v.size
        else (1e-5, 1e-1)
    )
    return pn.Column(
        pn.pane.HoloViews(heat, name="update_heatmap"),
        pn.pane.HoloViews(
            (band * curves).opts(
                title="update ratio (green band: 1e-3 rule of thumb, ±½ decade)",
                xlabel="step",
                ylabel="‖ΔW‖/‖W‖",
                ylim=ylim,
            ),
            name="update_curves",
        ),
    )


# ---- noise scale and curvature ------------------------------------------------------------
def dynamics_panel(data: SpectralData) -> pn.viewable.Viewable:
    parts: list[Any] = []
    for names, title, ylabel in (
        (["gns/b_simple"], "gradient noise scale B_simple (McCandlish et al. 2018)", "B_simple"),
        (["hessian/top_eigenvalue", "hessian/trace"], "Hessian top eigenvalue (and trace)", "λ"),
        (["lr"], "learning rate", "lr"),
        (["loss"], "loss", "loss"),
    ):
        df = data.scalars(names)
        if len(df):
            parts.append(
                pn.pane.HoloViews(
                    _curves(df, "name", ylabel).opts(title=title, height=250),
                    name=names[0].replace("/", "_"),
                )
            )
    cost = data.scalars(["hessian/seconds"])
    if len(cost):
        parts.append(
            _note(
                f"Hessian estimate cost: median {cost['value'].median():.2f} s over {len(cost)} "
                "estimates (`hessian/seconds`)."
            )
        )
    return pn.Column(*parts) if parts else _note("No noise-scale or curvature scalars.")


# ---- trajectory on the landscape ------------------------------------------------------------
class LandscapeView:
    def __init__(self, data: SpectralData) -> None:
        self.data = data
        self.traj = data.trajectory()
        n = len(self.traj)
        self.player = pn.widgets.Player(
            label="step",
            start=0,
            end=max(n - 1, 0),
            value=max(n - 1, 0),
            interval=200,
            loop_policy="once",
            width=400,
        )
        xs, ys = self.traj["x"].to_numpy(), self.traj["y"].to_numpy()
        grid = data.grid
        base: list[Any] = []
        if grid is not None:
            img = hv.Image(
                (grid.xs, grid.ys, np.log10(np.maximum(grid.loss, 1e-12))),
                ["direction 1", "direction 2"],
                "log10 loss",
            )
            base.append(img.opts(cmap="viridis", colorbar=True, alpha=0.85))
            base.append(
                hv.operation.contours(img, levels=12).opts(
                    cmap=["#ffffff"], line_width=1, show_legend=False
                )
            )
        base.append(
            hv.Path([np.column_stack([xs, ys])], ["direction 1", "direction 2"]).opts(
                color="#ff7f0e", line_width=2
            )
        )
        self.base = hv.Overlay(base)
        self.point = hv.DynamicMap(pn.bind(self._point, i=self.player))

    def _point(self, i: int) -> hv.Points:
        row = self.traj.iloc[min(int(i), len(self.traj) - 1)]
        return hv.Points([(row["x"], row["y"])], ["direction 1", "direction 2"]).opts(
            size=12,
            color="#d62728",
            line_color="white",
            tools=["hover"],
            title=f"step {int(row['step'])}",
        )

    def panel(self) -> pn.viewable.Viewable:
        g = self.data.grid
        if g is None:
            note = (
                "No landscape file beside the trace (dnntrace landscape … \\-\\-out "
                + md_escape(os.path.basename(landscape_path(self.data.path)))
                + "): the trajectory alone."
            )
        else:
            note = (
                f"Loss on a {g.loss.shape[1]}×{g.loss.shape[0]} grid along "
                f"{md_escape(g.info.get('tensor', '?'))} directions (Li et al. 2018), with the "
                "training trajectory projected on them."
            )
        plot = (self.base * self.point).opts(width=700, height=600, show_legend=False)
        return pn.Column(_note(note), self.player, pn.pane.HoloViews(plot, name="landscape"))


# ---- entry point ----------------------------------------------------------------------------
def _data(obj: Any, landscape: str | None) -> SpectralData:
    if isinstance(obj, SpectralData):
        return obj
    if isinstance(obj, str | os.PathLike):
        return SpectralData(obj, landscape)
    run = getattr(obj, "run", None)  # a RunStore: its current run
    runs = getattr(obj, "runs", None)
    if run is not None and runs and run in runs:
        return SpectralData(runs[run].path, landscape)
    paths = getattr(obj, "paths", None)
    if paths:
        return SpectralData(paths[0], landscape)
    raise TypeError(f"panels: expected a trace path, SpectralData or RunStore, got {obj!r}")


def panels(
    store_or_path: Any, landscape: str | None = None
) -> list[tuple[str, pn.viewable.Viewable]]:
    """The spectral tabs of one run: ``pn.Tabs(*panels("run.arrow"))``. ``landscape``: a file
    written by ``dnntrace landscape`` (default: ``<run>-landscape.arrow`` when it exists)."""
    data = _data(store_or_path, landscape)
    out: list[tuple[str, pn.viewable.Viewable]] = []
    out.append(
        (
            "Spectra",
            SpectraView(data).panel()
            if data.spectra
            else _note("No full spectra (`spectrum`/`esd` rows) in this trace."),
        )
    )
    out.append(("Layer spectra", layers_panel(data)))
    out.append(("Update ratio", update_ratio_panel(data)))
    out.append(("Noise & curvature", dynamics_panel(data)))
    out.append(
        (
            "Landscape",
            LandscapeView(data).panel()
            if data.has(K.TRAJECTORY)
            else _note("No `trajectory` rows (add `capture.spectral.Trajectory`)."),
        )
    )
    return out


class SpectralTab(RunTab):
    """The spectral and dynamics views of the store's current run."""

    title = "Spectra & dynamics"

    rows = "has_spectral_rows"

    def tabs(self) -> list[tuple[str, pn.viewable.Viewable]]:
        return panels(self.store.current.path)


__all__ = ["LandscapeView", "SpectraView", "SpectralTab", "esd_plot", "panels"]
