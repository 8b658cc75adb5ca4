"""The spectral views' data and plots from a real traced run (no browser)."""

from __future__ import annotations

from pathlib import Path

import holoviews as hv
import numpy as np
import panel as pn
import pytest

torch = pytest.importorskip("torch")

from _background import background_jobs_finish  # noqa: E402
from dnntrace_viewer.spectral_data import SpectralData  # noqa: E402
from dnntrace_viewer.views_spectral import esd_plot, panels  # noqa: E402


def make_spectral_trace(path: Path, steps: int = 24) -> Path:
    """A small MLP trained with every issue-6 extension, plus its landscape file."""
    from torch import nn

    import dnntrace
    from dnntrace.capture import spectral as SP

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 96), nn.Tanh(), nn.Linear(96, 80), nn.Tanh(), nn.Linear(80, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y)

    exts = [
        SP.HessianEigen(lambda: loss_fn(model), every=6, iters=10),
        SP.Trajectory(seed=3),
    ]
    with (
        background_jobs_finish(),
        dnntrace.enable(
            model,
            str(path),
            spectral={"full_every": 8, "sketch": {"every": 4}},
            dynamics={"micro_batch_size": 64},
            extensions=exts,
            host_buffers=64,
        ) as tr,
    ):
        for _ in range(steps):
            opt.zero_grad()
            for k in range(4):
                (
                    loss_fn(model) / 4
                    if k == 0
                    else nn.functional.cross_entropy(
                        model(x[64 * k : 64 * k + 64]), y[64 * k : 64 * k + 64]
                    )
                    / 4
                ).backward()
            tr.log_scalar("loss", loss_fn(model).detach())
            opt.step()
    SP.landscape(
        model,
        loss_fn,
        str(path).replace(".arrow", "-landscape.arrow"),
        trace=str(path),
        steps=9,
        span=1.0,
        progress=False,
    )
    return path


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_spectral_trace(tmp_path_factory.mktemp("spectral") / "run.arrow"))


def test_spectral_data_frames(trace: str) -> None:
    d = SpectralData(trace)
    assert {z.source_step for z in d.spectra} == {0, 8, 16}
    assert {z.layer for z in d.spectra} == {"0.weight", "2.weight", "4.weight"}
    z = [z for z in d.spectra if z.layer == "2.weight"][0]
    assert z.singular_values.size == 80 and np.all(np.diff(z.singular_values) <= 0)
    ur = d.layer_series("update_ratio")
    assert set(ur["layer"]) >= {"0.weight", "0.bias", "4.weight"} and (ur["value"] > 0).all()
    assert set(d.scalars(["gns/b_simple"])["step"]) == set(range(24))
    assert list(d.scalars(["hessian/top_eigenvalue"])["step"]) == [0, 6, 12, 18]
    assert len(d.trajectory()) == 24
    assert d.grid is not None and d.grid.loss.shape == (9, 9)
    assert d.grid.info["tensor"] == "random:3"
    assert set(d.rankme()["layer"]) == {"0", "2", "4"}


def test_esd_plot_draws_the_fit(trace: str) -> None:
    d = SpectralData(trace)
    z = [z for z in d.spectra if z.layer == "2.weight"][-1]
    ov = esd_plot(z)
    assert f"α = {z.alpha:.2f}" in ov.opts.get().kwargs["title"]
    hv.render(ov)  # bokeh figure builds


def test_panels_render(trace: str) -> None:
    tabs = panels(trace)
    assert [t for t, _ in tabs] == [
        "Spectra",
        "Layer spectra",
        "Update ratio",
        "Noise & curvature",
        "Landscape",
    ]
    for _, p in tabs:
        assert not isinstance(p, pn.pane.Markdown), p.object  # every tab has data here
        p.get_root()  # the bokeh model builds without error


def test_panels_on_a_plain_trace_say_what_is_missing(tmp_path: Path) -> None:
    from torch import nn

    import dnntrace

    m = nn.Linear(3, 2)
    with dnntrace.enable(m, str(tmp_path / "p.arrow")) as tr:
        m(torch.randn(2, 3)).sum().backward()
        tr.step()
    tabs = dict(panels(str(tmp_path / "p.arrow")))
    assert isinstance(tabs["Spectra"], pn.pane.Markdown)
    assert "No `update_ratio` rows" in tabs["Update ratio"].object


def test_spectra_tab_names_skipped_spectra(tmp_path: Path) -> None:
    """A step whose full spectrum the tracer skipped (``spectrum/skipped`` = 1: the background
    worker was busy) is named under the ESD plot; a trace without such rows has no note."""
    from torch import nn

    import dnntrace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 60), nn.Tanh(), nn.Linear(60, 3))

    def notes(name: str, skipped_at: tuple[int, ...]) -> list[str]:
        path = str(tmp_path / name)
        with (
            background_jobs_finish(),
            dnntrace.enable(model, path, spectral={"full_every": 2, "activations": False}) as tr,
        ):
            for step in range(6):
                model(torch.randn(16, 8)).sum().backward()
                if step in skipped_at:
                    tr.log_scalar("spectrum/skipped", 1.0)
                tr.step()
        col = dict(panels(path))["Spectra"]
        return [o.object for o in col.objects if isinstance(o, pn.pane.Markdown)]

    # odd steps are not due: the note can only come from these rows
    assert any("2 full spectra were skipped (steps 3, 5)" in n for n in notes("s.arrow", (3, 5)))
    assert any("1 full spectrum was skipped (step 5)" in n for n in notes("one.arrow", (5,)))
    assert not any("skipped" in n for n in notes("plain.arrow", ()))
