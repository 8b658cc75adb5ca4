"""Rank x step / rank x layer grids (in memory, Dask, a LocalCluster on 127.0.0.1) and the tabs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import panel as pn
import pyarrow as pa
import pytest
from _synthetic import write_synthetic_ranks

from dnntrace.storage.runs import open_runs, read_batches
from dnntrace_viewer import ranks_data as R
from dnntrace_viewer.views_ranks import RanksViews, panels

RANKS, STEPS, MODULES = 4, 30, ("fc1", "fc2", "fc3")


@pytest.fixture(scope="module")
def rank_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_synthetic_ranks(tmp_path_factory.mktemp("ranks") / "run", ranks=RANKS,
                                   steps=STEPS, modules=MODULES)  # fmt: skip


def _expected_rms(folder: str, by: str) -> pd.DataFrame:
    df = open_runs(folder).select(kind="activation").to_pandas()
    df["module"] = df["module"].astype(str)
    df["finite"] = df["count"] - df["nan_count"]
    g = df.groupby(["rank", by])[["sumsq", "finite"]].sum()
    return np.sqrt(g["sumsq"] / g["finite"]).unstack(by)


def test_rank_step_grid_is_exact(rank_folder: str) -> None:
    g = R.grid(open_runs(rank_folder), "activation", "rms")
    assert g.dims == ("rank", "step") and g.shape == (RANKS, STEPS)
    np.testing.assert_allclose(g.values, _expected_rms(rank_folder, "step").to_numpy(), rtol=1e-12)
    rel = R.grid(open_runs(rank_folder), "activation", "rms", relative=True)
    assert (rel.values[3] > 0.5).all() and (np.abs(rel.values[:3]) < 0.5).all()  # divergent rank


def test_rank_layer_grid_orders_modules(rank_folder: str) -> None:
    runs = open_runs(rank_folder)
    g = R.grid(runs, "activation", "rms", x="module")
    exp = _expected_rms(rank_folder, "module")[list(MODULES)].to_numpy()
    assert runs.modules == ["", *MODULES]
    assert np.isnan(g.values[:, 0]).all()  # the root module has no rows
    np.testing.assert_allclose(g.values[:, 1:], exp, rtol=1e-12)


def test_nan_origin_and_stragglers(rank_folder: str) -> None:
    runs = open_runs(rank_folder)
    first = runs.first_nonfinite()
    assert (first[0]["rank"], first[0]["step"], first[0]["module"]) == (2, 20, "fc2")
    assert {b["rank"]: b["step"] for b in first} == {0: 21, 1: 21, 2: 20, 3: 21}
    nf = R.grid(runs, "activation", "nonfinite")
    assert nf.values[2, 20] == 3 and nf.values[0, 20] == 0
    lag = runs.step_times().to_pandas().groupby("rank")["lag_s"].median()
    assert lag.idxmax() == 1 and lag[1] > 0.04


def test_dask_partitions_read_the_same_rows(rank_folder: str) -> None:
    runs = open_runs(rank_folder)
    path = runs.files[0].path
    with pa.memory_map(path) as src:
        batches = list(pa.ipc.open_stream(src))
    expected = pa.Table.from_batches(batches[5:9]).to_pandas()
    part = read_batches(path, 5, 9).to_pandas()
    assert len(part) == len(expected) > 0
    lists = ["hist_bucket", "hist", "shape", "values"]
    pd.testing.assert_frame_equal(part.drop(columns=lists), expected.drop(columns=lists))
    ddf = runs.to_dask(batches_per_partition=7)
    assert ddf.npartitions == RANKS * -(-len(batches) // 7)
    got = ddf.groupby("rank")["sumsq"].sum().compute().sort_index()
    exp = runs.to_pandas().groupby("rank")["sumsq"].sum().sort_index()
    np.testing.assert_allclose(got.to_numpy(), exp.to_numpy(), rtol=1e-12)
    d = R.grid(runs, "activation", "rms", use_dask=True)
    np.testing.assert_allclose(d.values, R.grid(runs, "activation", "rms").values, rtol=1e-12)


def test_local_cluster_scheduler(rank_folder: str) -> None:
    distributed = pytest.importorskip("distributed")
    runs = open_runs(rank_folder)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  host="127.0.0.1", protocol="tcp", dashboard_address=None
                                  ) as cluster:  # fmt: skip
        addr = cluster.scheduler_address
        assert addr.startswith("tcp://127.0.0.1:")
        g = R.grid(runs, "weight_grad", "rms", x="module", scheduler=addr)
        R._CLIENTS.pop(addr).close()
    np.testing.assert_allclose(g.values, R.grid(runs, "weight_grad", "rms", x="module").values,
                               rtol=1e-12)  # fmt: skip


def test_panels_render(rank_folder: str) -> None:
    tabs = panels(rank_folder)
    assert [t for t, _ in tabs] == ["Ranks × steps", "Ranks × layers", "Stragglers & NaN",
                                    "Merged"]  # fmt: skip
    pn.Tabs(*tabs).get_root()
    v = RanksViews(open_runs(rank_folder))
    assert "rank 2 at step 20" in v.health()[0].object
    v.kind.value = "weight_grad"
    v.stat.value = "nonfinite"
    z = v.rank_step().dimension_values("nonfinite", flat=False)
    # 3 NaNs a step: rank 2 from step 20, the other three ranks from step 21
    assert z.shape == (RANKS, STEPS) and np.nansum(z) == 3 * (10 + 3 * 9)


def test_several_runs(rank_folder: str, tmp_path: Path) -> None:
    other = write_synthetic_ranks(tmp_path / "other", ranks=2, steps=5, nan=None, seed=1)
    runs = open_runs([rank_folder, other])
    assert runs.runs == ["run", "other"] and runs.ranks("other") == [0, 1]
    g = R.grid(runs, "activation", "rms", run="other")
    assert g.shape == (2, STEPS) and np.isfinite(g.values[:, :5]).all()
    assert np.isnan(g.values[:, 5:]).all()
