"""The per-unit data helpers and views without a browser: dead/saturated maps, attribution
totals, anomalies, top-k, and the pyramid that keeps big heatmaps cheap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dnntrace_viewer.units_data import Pyramid, UnitData  # noqa: E402


def make_units_trace(path: Path, steps: int = 8) -> Path:
    """An MLP with three killed ReLUs and a NaN planted at step 5 (shared with the UI test)."""
    from torch import nn

    import dnntrace

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 12), nn.Tanh(), nn.Linear(12, 2))
    with torch.no_grad():
        m[0].bias[[1, 5, 9]] = -100.0
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with dnntrace.enable(
        m,
        path,
        host_buffers=64,
        activations_every=1,  # the anomaly is found in activation rows of every step
        units={"topk": 3, "topk_every": 2, "every": 1},  # every step (the default is sparser)
        on_anomaly="record",
    ):
        for i in range(steps):
            if i == 5:
                with torch.no_grad():
                    m[2].weight[0, 0] = float("nan")
            loss = m(torch.randn(32, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> UnitData:
    return UnitData.open(make_units_trace(tmp_path_factory.mktemp("units") / "t.arrow"))


def test_matrix_and_dead_units(data: UnitData) -> None:
    assert data.modules("unit_firing") == ["0", "1", "2", "3", "4"]
    f = data.matrix("1", "unit_firing")
    assert f.values.shape == (24, 8) and list(f.steps) == list(range(8))
    assert data.dead_units("1", window=5) == [1, 5, 9]
    d = data.dead("1", window=5)
    assert not d.values[:, :4].any() and d.values[[1, 5, 9], 4:].all()
    df = data.dead_fractions(window=5)
    row = df[(df.module == "1") & (df.step == 7)].iloc[0]
    assert row.dead == pytest.approx(3 / 24) and row.saturated == pytest.approx(3 / 24)


def test_attribution_totals(data: UnitData) -> None:
    tot = data.attribution_totals()
    a = data.matrix("2", "unit_attr_abs").values
    got = tot[tot.module == "2"].attr_abs.to_numpy()
    np.testing.assert_allclose(got, np.nansum(a, 0), rtol=1e-6)
    assert set(tot.module) == {"0", "1", "2", "3", "4"}


def test_anomaly_timeline(data: UnitData) -> None:
    an = data.anomalies()
    fwd = an[an.direction == "forward"].iloc[0]
    assert fwd.module == "2" and fwd.step == 5 and fwd.source == "execution order"
    tl = data.nonfinite_timeline()
    assert (tl[tl.step < 5].bad_values == 0).all() and tl[tl.step == 5].bad_values.iloc[0] > 0


def test_topk_list(data: UnitData) -> None:
    top = data.topk("0", 0)
    assert list(top.columns) == ["rank", "value", "sample", "step"]
    assert len(top) == 3 and (np.diff(top.value) <= 0).all()
    dead = data.topk("0", 1)  # a killed unit still has its largest (negative) inputs
    assert len(dead) == 3 and (dead.value < -90).all()


def test_pyramid_windows_are_bounded_and_exact_at_level_0() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1000, 3000)).astype(np.float32)
    p = Pyramid(a)
    w, (r0, r1, c0, c1) = p.window(0, 1000, 0, 3000, 100, 200)
    assert w.shape[0] <= 2 * 2 * 100 and w.shape[1] <= 2 * 2 * 200
    assert w.shape[0] >= 100 and w.shape[1] >= 200
    f = 1000 // w.shape[0] if w.shape[0] else 1
    np.testing.assert_allclose(w[0, 0], a[:f, :f].mean(), rtol=1e-5)
    w0, b = p.window(10, 20, 30, 50, 100, 200)  # a small window: level 0, exact cells
    np.testing.assert_array_equal(w0, a[10:20, 30:50])
    assert b == (10, 20, 30, 50)
    pm = Pyramid(a, how="max")
    assert pm.levels[-1].max() == a.max()


def test_panels_build(data: UnitData) -> None:
    from dnntrace_viewer.views_units import UnitHeatmap, _matrix_source, panels

    titles = [t for t, _ in panels(data.trace)]
    assert titles == [
        "Units × steps",
        "Dead / saturated",
        "Anomalies",
        "Attribution",
        "Top-k inputs",
    ]
    heat = UnitHeatmap(_matrix_source(data), ["1"], ["unit_firing"], width=50, height=20)
    img = heat._image("1", "unit_firing", (2.0, 5.0), (0.0, 12.0))
    assert img.data["unit_firing"].shape == (12, 4)


@pytest.mark.parametrize("name", ["demo_trace", "clean_trace"])
def test_anomaly_text_agrees_with_the_timeline(name: str, request: pytest.FixtureRequest) -> None:
    """'no NaN or Inf recorded' exactly when the NaN/Inf-per-step plot below it is flat: with
    and without a NaN, and without anomaly rows (the reader's first NaN/Inf stands in)."""
    from dnntrace_viewer.views_units import anomaly_view

    data = UnitData.open(request.getfixturevalue(name))
    text = anomaly_view(data).objects[0].object
    bad = int(data.nonfinite_timeline()["bad_values"].sum())
    assert ("no NaN or Inf recorded" in text) == (bad == 0)
    assert (name == "demo_trace") == (bad > 0)  # the demo plants a NaN, the clean run none
    if bad:
        first = int(data.nonfinite_timeline().query("bad_values > 0")["step"].min())
        assert f"step {first}:" in text
