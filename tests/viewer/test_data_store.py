"""RunStore and Run without a browser: selection, statistics, health flags, live follow."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _synthetic import SyntheticSpec, write_synthetic

from dnntrace.storage import TraceWriter, load
from dnntrace_viewer.data_store import Run, RunStore, find_traces


def test_import_does_not_pull_torch() -> None:
    code = (
        "import sys, dnntrace_viewer, dnntrace_viewer.data_store, dnntrace_viewer.views, "
        "dnntrace_viewer.cli, dnntrace_viewer.export; assert 'torch' not in sys.modules, "
        "'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def store(demo_trace: str) -> RunStore:
    return RunStore(paths=[demo_trace])


def test_store_selection_defaults(store: RunStore, spec: SyntheticSpec) -> None:
    assert store.run == "demo.arrow"
    assert store.param.module.objects[:3] == ["fc0", "act0", "fc1"]
    assert store.module == "fc2"  # the first non-finite value is in layer 2's gradients
    assert store.steps == (0, spec.steps - 1)
    assert store.kind in store.param.kind.objects
    store.param.update(steps=(10, 20), kind="weight")
    assert store.steps == (10, 20) and store.kind == "weight"


def test_health_flags(store: RunStore, spec: SyntheticSpec) -> None:
    h = store.current.health().set_index("path")
    flags = {p: set(f.split()) for p, f in h["flags"].items()}
    assert "frozen" in flags["fc0"] and "frozen" not in flags["fc1"]
    assert "dead" in flags["act2"] and "dead" not in flags["act1"]
    assert "nan" in flags["fc2"] and "nan" in flags["act2"] and "nan" not in flags["fc1"]
    assert h.loc["fc2", "first_nan_step"] == spec.nan_step
    assert "saturated" in flags["act3"] and "saturated" not in flags["act0"]
    assert "vanishing" in flags["fc0"] and "vanishing" not in flags["act3"]
    assert h.loc["act3", "grad_ratio"] == pytest.approx(1.0)
    bad = store.current.first_nonfinite()
    assert bad is not None and (bad["step"], bad["module"]) == (spec.nan_step, "fc2")


def test_clean_run_has_no_flags(clean_trace: str) -> None:
    h = Run.open(clean_trace, use_cache=False).health()
    assert set(" ".join(h["flags"]).split()) <= {"saturated", "vanishing"}
    assert not any("nan" in f or "dead" in f or "frozen" in f for f in h["flags"])


def test_stats_and_heatmap_agree_with_summaries(
    demo_trace: str, store: RunStore, spec: SyntheticSpec
) -> None:
    tr = load(demo_trace)
    mods, steps, z = store.current.heatmap("std", "activation_grad")
    assert mods == store.current.modules and steps.size == spec.steps
    i, j = mods.index("act1"), 17
    assert z[i, j] == pytest.approx(tr.summary("act1", "activation_grad", j).std, rel=1e-9)
    _, _, zf = store.current.heatmap("zero_frac", "activation")
    assert zf[mods.index("act2"), -1] > 0.99 and zf[mods.index("act1"), -1] < 0.01
    with pytest.raises(ValueError, match="unknown statistic"):
        store.current.heatmap("median", "activation")


def test_distribution_is_a_fraction(store: RunStore) -> None:
    run = store.current
    ym = run.ymap("activation")
    lo, hi = run.value_range("activation")
    x, f = run.distribution(
        "act1", "activation", 5, ym, (float(ym.fwd(lo)) - 1, float(ym.fwd(hi)) + 1)
    )
    assert x.shape == f.shape and f.sum() == pytest.approx(1.0, abs=1e-6)
    _, g = run.distribution("act1", "activation", 39, ym, (-9, 9))
    assert not np.allclose(f, g)  # the distribution moves over the run


def test_quantile_bands_ordered(store: RunStore) -> None:
    steps, q = store.current.quantile_bands("fc1", "activation")
    assert q.shape == (steps.size, 7)
    assert np.all(np.diff(q, axis=1) >= 0)


def test_find_traces_folder(tmp_path, demo_trace: str) -> None:
    shutil.copy(demo_trace, tmp_path / "b.arrow")
    shutil.copy(demo_trace, tmp_path / "a.arrow")
    assert [p.rsplit("/", 1)[1] for p in find_traces([str(tmp_path)])] == ["a.arrow", "b.arrow"]
    two = RunStore(paths=find_traces([str(tmp_path)]))
    assert two.param.compare.objects == [None, "a.arrow", "b.arrow"]


def test_follow_picks_up_new_steps(tmp_path) -> None:
    path = tmp_path / "live.arrow"
    spec = SyntheticSpec(
        steps=30, layers=2, width=8, batch=4, nan_step=None, dead_layer=None, steps_per_batch=10
    )
    write_synthetic(path, spec)
    full = load(path)
    batches = full.table.to_batches()
    writer = TraceWriter(tmp_path / "grow.arrow", dict(full.metadata))
    half = len(batches) // 2
    for b in batches[:half]:
        writer.write(b)
    store = RunStore(paths=[str(tmp_path / "grow.arrow")], follow=True)
    n0 = int(store.step_values().size)
    v0 = store.version
    assert not store.poll()
    for b in batches[half:]:
        writer.write(b)
    writer.close()
    assert store.poll()
    assert store.step_values().size > n0 and store.version > v0
    assert store.steps[1] == 29


def test_all_nan_trace_still_renders(tmp_path) -> None:
    from dnntrace.storage import Layout, state_to_batch
    from dnntrace.storage import layout as L

    lay = Layout()
    path = tmp_path / "nan.arrow"
    meta = {"layout": lay.to_dict(), "modules": [{"name": "a", "type": "Linear", "depth": 1}]}
    with TraceWriter(path, meta) as w:
        for step in range(3):
            counts = np.zeros((1, lay.width), np.int64)
            counts[0, L.COUNT] = counts[0, L.NAN] = 100
            m = np.zeros((1, L.NUM_MOMENTS))
            m[0, L.MIN], m[0, L.MAX] = math.inf, -math.inf
            w.write(
                state_to_batch(
                    counts,
                    m,
                    lay,
                    step=step,
                    module=["a"],
                    kind=["activation"],
                    tensor=[""],
                    dtype=["float32"],
                    shape=[(100,)],
                )
            )
    store = RunStore(paths=[str(path)])
    h = store.current.health()
    assert "nan" in h.set_index("path").loc["a", "flags"]
    from dnntrace_viewer.views import HistogramOverTime

    view = HistogramOverTime(store=store)
    assert view.renders == 1
    assert view.source.data["image"][0].shape == (view.level.ny, view.level.nx)


def test_scans_without_histograms_give_the_full_tables_answers(demo_trace: str) -> None:
    """The store scans (anomalies, execution order) a copy of the table without its two
    histogram columns, which a filter would otherwise copy: same answers as the full table."""
    from dnntrace_viewer.data_store import _without_histograms

    full = load(demo_trace)
    light = _without_histograms(full)
    assert {"hist", "hist_bucket"} & set(light.table.column_names) == set()
    assert {"hist", "hist_bucket"} <= set(full.table.column_names)
    assert light.anomalies() == full.anomalies() and len(full.anomalies()) > 0
    assert light.execution_order == full.execution_order
