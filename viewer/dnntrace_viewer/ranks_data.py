"""Rank x step and rank x layer grids of a run's rank files, aggregated by Datashader.

Rows are reduced to additive parts (finite count, sum, sum of squares, non-finite count) and max
``absmax``, so a grid cell over many rows, modules or steps is exact: ``rms`` is
sqrt(sum sumsq / sum finite) over the cell's rows, not a mean of means. ``use_dask=True`` (or a
``scheduler`` address of a running ``dask.distributed`` cluster) aggregates a Dask dataframe
that reads the files a few record batches per partition (Datashader's out-of-core path);
otherwise the rows are read into memory. Imports only ``dnntrace.storage`` of dnntrace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datashader as ds
import numpy as np
import pandas as pd
import pyarrow as pa
import xarray as xr

from dnntrace.sketch import merge as SK
from dnntrace.storage.runs import RunSet, open_runs

STATS = ("rms", "mean", "absmax", "nonfinite", "sumsq")
_CLIENTS: dict[str, Any] = {}


def client_for(address: str) -> Any:
    """A ``dask.distributed.Client`` of the cluster at ``address`` (one per address)."""
    from distributed import Client

    c = _CLIENTS.get(address)
    if c is None or c.status not in ("running", "connecting"):
        c = _CLIENTS[address] = Client(address, set_as_default=False)
    return c


def _prepare(df: Any) -> Any:
    """Additive parts of each row, as float columns Datashader can sum (pandas or Dask)."""
    nonfinite = df["nan_count"] + df["posinf_count"] + df["neginf_count"]
    return df.assign(
        finite=(df["count"] - nonfinite).astype("float64"),
        nonfinite=nonfinite.astype("float64"),
        absmax=df["absmax"].fillna(0.0),
        x_step=df["step"].astype("float64"),
        x_module=df["module_index"].astype("float64"),
        y_rank=df["rank"].astype("float64"),
    )


def rows(
    runs: RunSet,
    kind: str,
    *,
    run: str | None = None,
    module: str | None = None,
    use_dask: bool = False,
    batches_per_partition: int = 16,
) -> Any:
    """Rank rows (``rank >= 0``) of ``kind`` with their additive parts; Dask when asked."""
    cols = ["run", "rank", "step", "module", "module_index", "kind", "count", "nan_count",
            "posinf_count", "neginf_count", "sum", "sumsq", "absmax"]  # fmt: skip
    if use_dask:
        df = runs.to_dask(cols, batches_per_partition=batches_per_partition)
    else:
        t = runs.select(kind=kind, run=run, module=module)
        order = {m: i for i, m in enumerate(runs.modules)}
        mods = t.column("module").cast(pa.string()).to_pylist()
        df = t.select([c for c in cols if c != "module_index"]).to_pandas()
        for c in ("run", "module", "kind"):
            df[c] = df[c].astype(str)
        df["module_index"] = np.array([order.get(m, -1) for m in mods], np.int32)
    mask = (df["kind"] == kind) & (df["rank"] >= 0)
    if run is not None:
        mask &= df["run"] == run
    if module is not None:
        mask &= df["module"] == module
    return _prepare(df[mask])


def _stat(parts: xr.Dataset, stat: str) -> xr.DataArray:
    finite = parts["finite"]
    with np.errstate(divide="ignore", invalid="ignore"):
        if stat == "rms":
            out = SK.rms(parts["sumsq"], finite)
        elif stat == "mean":
            out = SK.mean(parts["sum"], finite)
        elif stat == "sumsq":
            out = parts["sumsq"].where(parts["n"] > 0)
        elif stat == "absmax":
            out = parts["absmax"].where(parts["n"] > 0)
        elif stat == "nonfinite":
            out = parts["nonfinite"].where(parts["n"] > 0)
        else:
            raise ValueError(f"unknown statistic {stat!r}; one of {', '.join(STATS)}")
    return out.where(parts["n"] > 0)


def grid(
    runs: RunSet,
    kind: str,
    stat: str = "rms",
    *,
    x: str = "step",
    run: str | None = None,
    module: str | None = None,
    steps: tuple[int, int] | None = None,
    relative: bool = False,
    use_dask: bool = False,
    scheduler: str | None = None,
    max_columns: int = 2000,
) -> xr.DataArray:
    """A ``rank x step`` (``x="step"``) or ``rank x module`` (``x="module"``) grid of ``stat``
    over ``kind``'s rows. ``relative``: each column divided by its mean over ranks, minus 1
    (divergence between ranks). Columns are exact steps / modules up to ``max_columns``."""
    if x not in ("step", "module"):
        raise ValueError(f"x must be 'step' or 'module', got {x!r}")
    ranks = runs.ranks(run)
    if not ranks:
        raise ValueError("no rank files in this run set")
    df = rows(runs, kind, run=run, module=module, use_dask=use_dask or scheduler is not None)
    if steps is not None:
        df = df[(df["step"] >= steps[0]) & (df["step"] <= steps[1])]
    if x == "step":
        all_steps = runs.steps if steps is None else np.arange(steps[0], steps[1] + 1)
        lo, hi = (int(all_steps.min()), int(all_steps.max())) if len(all_steps) else (0, 0)
        xcol = "x_step"
    else:
        lo, hi = 0, max(len(runs.modules) - 1, 0)
        xcol = "x_module"
    width = min(hi - lo + 1, max_columns)
    height = max(ranks) + 1
    cvs = ds.Canvas(
        plot_width=width,
        plot_height=height,
        x_range=(lo - 0.5, hi + 0.5),
        y_range=(-0.5, height - 0.5),
    )
    agg = ds.summary(
        n=ds.count(),
        finite=ds.sum("finite"),
        sum=ds.sum("sum"),
        sumsq=ds.sum("sumsq"),
        nonfinite=ds.sum("nonfinite"),
        absmax=ds.max("absmax"),
    )
    if scheduler is not None:
        import dask

        with dask.config.set(scheduler=client_for(scheduler).get):
            parts = cvs.points(df, xcol, "y_rank", agg=agg)
    else:
        parts = cvs.points(df, xcol, "y_rank", agg=agg)
    out = _stat(parts, stat)
    if relative:
        mean = out.mean("y_rank", skipna=True)
        out = out / mean - 1.0
    out = out.rename({xcol: x, "y_rank": "rank"})
    out = out.assign_coords(rank=np.arange(height))
    if x == "step" and width == hi - lo + 1:
        out = out.assign_coords(step=np.arange(lo, hi + 1))
    elif x == "module":
        out = out.assign_coords(module=np.arange(width))
    out.name = stat if not relative else f"{stat} / rank mean - 1"
    return out


def vector_curves(runs: RunSet, kinds: Sequence[str], run: str | None = None) -> pd.DataFrame:
    """(kind, rank, step, value) of vector rows summed over their entries (gradient diversity,
    noise scale, per-bucket norms); empty when the run has none."""
    t = runs.select(kind=list(kinds), run=run)
    if t.num_rows == 0:
        return pd.DataFrame({"kind": [], "rank": [], "step": [], "value": []})
    vals = [
        float(np.nansum(v)) if v is not None else np.nan for v in t.column("values").to_pylist()
    ]
    return pd.DataFrame(
        {
            "kind": t.column("kind").cast(pa.string()).to_pylist(),
            "rank": t.column("rank").to_numpy(),
            "step": t.column("step").to_numpy(),
            "value": vals,
        }
    )


def merged_curve(
    runs: RunSet, kind: str, module: str | None = None, run: str | None = None
) -> pd.DataFrame:
    """(step, rank, rms) per rank and, as rank -1, merged over ranks (exact: sums of the
    rank rows, or the ``merged.arrow`` rows where they exist)."""
    df = rows(runs, kind, run=run, module=module)
    per = df.groupby(["rank", "step"])[["finite", "sumsq"]].sum().reset_index()
    merged = df.groupby("step")[["finite", "sumsq"]].sum().reset_index().assign(rank=-1)
    out = pd.concat([per, merged], ignore_index=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["rms"] = np.sqrt(out["sumsq"] / out["finite"])
    return out[["step", "rank", "rms"]]


__all__ = [
    "STATS",
    "client_for",
    "grid",
    "merged_curve",
    "open_runs",
    "rows",
    "vector_curves",
]
