"""The issue-6 extensions end to end: train a small model traced, read the rows back, compare
with direct computation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import dnntrace
from _background import background_jobs_finish
from dnntrace.capture import spectral as SP
from dnntrace.stats.spectral import fit_power_law


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 60), nn.Tanh(), nn.Linear(60, 3)
    )


def _rows(path: str, kind: str) -> dict[tuple[int, str, str], np.ndarray]:
    t = dnntrace.load(path).select(kind=kind)
    out = {}
    for s, m, x, v in zip(
        t.column("step").to_pylist(),
        t.column("module").cast("string").to_pylist(),
        t.column("tensor").cast("string").to_pylist(),
        t.column("values").to_pylist(),
        strict=True,
    ):
        out[(s, m, x)] = np.asarray(v, np.float64)
    return out


def _scalars(path: str, name: str) -> dict[int, float]:
    t = dnntrace.load(path).select(kind="scalar", tensor=name)
    return dict(zip(t.column("step").to_pylist(), t.column("sum").to_pylist(), strict=True))


@pytest.fixture
def jobs_finish() -> Iterator[None]:
    with background_jobs_finish():
        yield


def test_weight_spectra_and_update_ratios_match_direct_computation(tmp_path, jobs_finish) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    path = str(tmp_path / "t.arrow")
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    weights, befores = [], []
    with dnntrace.enable(
        model,
        path,
        spectral={"full_every": 10, "activations": False},
        dynamics=True,
        host_buffers=64,
    ) as tr:
        for _ in range(30):
            befores.append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert tr.stats()["disabled"] is None
    sig = _rows(path, "sigma_max")
    sr = _rows(path, "stable_rank")
    upd = _rows(path, "update_ratio")
    w = weights[29]["2.weight"].double().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    # warm-started power iteration, one iteration a step: a lower bound of σ₁, close to it
    # after 30 steps even for this random matrix (σ₂/σ₁ = {s[1] / s[0]:.3f})
    got = sig[(29, "2", "weight")][0]
    assert s[0] * 0.97 <= got <= s[0] * (1 + 1e-6)
    assert sr[(29, "2", "weight")][0] == pytest.approx((s**2).sum() / got**2, rel=1e-5)
    w4 = weights[29]["4.weight"].double().numpy()  # 3 × 60: a larger gap
    assert sig[(29, "4", "weight")][0] == pytest.approx(np.linalg.norm(w4, 2), rel=1e-3)
    assert set(m for _, m, _ in sig) == {"0", "2", "4"}  # matrices only
    for step in (0, 17):
        for name in ("0.weight", "4.bias"):
            m, p = name.split(".")
            d = weights[step][name] - befores[step][name]
            ref = d.norm().item() / befores[step][name].norm().item()
            assert upd[(step, m, p)][0] == pytest.approx(ref, rel=1e-4)
    # full spectra: computed in the background from the weights of steps 0, 10, 20; each esd
    # row names the step it describes; spectrum = numpy's singular values of those weights
    spec, esd = _rows(path, "spectrum"), _rows(path, "esd")
    got = {int(v[0]): (k, v) for k, v in esd.items() if k[1] == "2"}
    assert sorted(got) == [0, 10, 20]
    for src, ((row_step, m, p), v) in got.items():
        assert row_step >= src
        ref = np.linalg.svd(weights[src]["2.weight"].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(spec[(row_step, m, p)], ref, rtol=1e-5)
        fit = fit_power_law(ref**2)
        assert v[1] == pytest.approx(fit.alpha, rel=1e-5)
        assert v[2] == pytest.approx(fit.ks_distance, rel=1e-4)
        assert v[5] == 60
    lr = _scalars(path, "lr")
    assert lr[3] == pytest.approx(0.05)
    assert _scalars(path, "spectrum/skipped") == {}


def test_busy_worker_skips_and_marks_the_step(tmp_path) -> None:
    """A full spectrum due while the previous job still runs is skipped, never queued or waited
    for: the step gets ``spectrum/skipped`` = 1 and no esd row names it; the next due step after
    the worker frees up is computed."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = str(tmp_path / "busy.arrow")
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    ws = SP.WeightSpectra(every=1, full_every=2)
    release = __import__("threading").Event()
    with dnntrace.enable(model, path, extensions=[ws], host_buffers=64) as tr:
        for step in range(8):
            if step == 1:  # the worker is idle after step 0's job; occupy it until step 5
                ws._worker.wait()
                assert ws._worker.submit(lambda: (release.wait(30), [])[1])
            if step == 5:
                release.set()
                ws._worker.wait()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert tr.stats()["disabled"] is None
    assert _scalars(path, "spectrum/skipped") == {2: 1.0, 4: 1.0}
    esd = _rows(path, "esd")
    assert sorted({int(v[0]) for (_, m, _), v in esd.items() if m == "2"}) == [0, 6]


def test_activation_sketch_and_rankme(tmp_path, jobs_finish) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = str(tmp_path / "a.arrow")
    g = torch.Generator().manual_seed(0)
    # inputs of rank 4: the first layer's pre-activations have rank ≤ 5 (with the bias)
    basis = torch.randn(4, 12, generator=g)
    sk = SP.ActivationSketch(every=2, ell=8, max_rows=10_000, rankme_rows=256)
    captured = {}
    with dnntrace.enable(model, path, extensions=[sk], host_buffers=64) as tr:
        for step in range(5):
            x = torch.randn(100, 4, generator=g) @ basis
            if step == 4:
                with torch.no_grad():
                    captured["h"] = model[0](x).double()
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    assert tr.stats()["disabled"] is None
    eig = _rows(path, "feature_eigs")
    assert sorted({s for s, _, _ in eig}) == [0, 2, 4]
    assert {m for _, m, _ in eig} == {"0", "2", "4"}
    h = captured["h"].numpy()
    ref = np.linalg.eigvalsh(h.T @ h / h.shape[0])[::-1][:8]
    got = eig[(4, "0", "")]
    # FD bound: each eigenvalue is low by at most ‖A − A_k‖F²/(ℓ − k) / rows; rank ≤ 5 < ℓ:
    # exact up to rounding
    np.testing.assert_allclose(got[:5], ref[:5], rtol=1e-4)
    # RankMe runs in a background thread (each job finishes here: ``jobs_finish``). The inputs
    # have rank 4 at every step, so the effective rank is within [1, 5].
    rk = _rows(path, "rankme")
    rows0 = [v for (s, m, _), v in rk.items() if m == "0"]
    assert sorted(int(v[0]) for v in rows0) == [0, 2, 4]
    for v in rows0:
        assert 1.0 <= v[1] <= 5.0 + 1e-3 and v[2] == 100
    assert _scalars(path, "rankme/skipped") == {}


def test_noise_scale_under_accumulation(tmp_path) -> None:
    torch.manual_seed(1)
    model = nn.Linear(20, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the estimate at a fixed point
    path = str(tmp_path / "g.arrow")
    w_true = torch.randn(20, 1)
    g = torch.Generator().manual_seed(2)
    ext = SP.GradientNoiseScale(micro_batch_size=8, beta=0.9)
    k = 4
    with dnntrace.enable(model, path, extensions=[ext], activations=False, host_buffers=256) as tr:
        for _ in range(200):
            opt.zero_grad()
            for _ in range(k):
                x = torch.randn(8, 20, generator=g)
                y = x @ w_true + 0.5 * torch.randn(8, 1, generator=g)
                (((model(x) - y) ** 2).mean() / k).backward()
            opt.step()
    assert tr.stats()["disabled"] is None
    # reference: per-example gradients at the fixed weights over many examples
    x = torch.randn(20_000, 20, generator=g)
    y = x @ w_true + 0.5 * torch.randn(20_000, 1, generator=g)
    r = model(x).detach() - y
    per_ex = 2 * r * x
    gbar = per_ex.mean(0)
    b_true = ((per_ex - gbar) ** 2).sum(1).mean().item() / gbar.square().sum().item()
    b = _scalars(path, "gns/b_simple")
    assert len(b) == 200 and all(np.isfinite(v) for v in b.values())
    # each step's estimates are unbiased: their means over 200 steps recover |G|² and tr(Σ)
    g2 = np.mean(list(_scalars(path, "gns/grad_sq").values()))
    tr_cov = np.mean(list(_scalars(path, "gns/trace_cov").values()))
    # the loss was divided by k: both estimates are in units of the accumulated gradient (1/k²)
    assert g2 * k * k == pytest.approx(gbar.square().sum().item(), rel=0.2)
    assert tr_cov / g2 == pytest.approx(b_true, rel=0.25)
    assert np.median(list(b.values())[100:]) == pytest.approx(b_true, rel=0.5)


def test_no_noise_scale_without_accumulation(tmp_path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = str(tmp_path / "n.arrow")
    with dnntrace.enable(model, path, extensions=[SP.GradientNoiseScale()]):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 12)).sum().backward()
            opt.step()
    assert _scalars(path, "gns/b_simple") == {}


def test_hessian_extension_pauses_tracing_and_matches_the_direct_estimate(tmp_path) -> None:
    model = _model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    path = str(tmp_path / "h.arrow")
    x = torch.randn(32, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))

    def closure() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    ext = SP.HessianEigen(closure, every=2, iters=200, tol=1e-8)
    with dnntrace.enable(model, path, extensions=[ext], host_buffers=64, activations_every=1):
        for _ in range(3):
            opt.zero_grad()
            closure().backward()
            opt.step()
    from dnntrace.stats.curvature import top_hessian_eigenvalue

    ref = top_hessian_eigenvalue(closure, list(model.parameters()), iters=300, tol=1e-10)
    ev = _scalars(path, "hessian/top_eigenvalue")
    assert sorted(ev) == [0, 2]
    assert ev[2] == pytest.approx(ref.eigenvalue, rel=1e-4)
    assert _scalars(path, "hessian/seconds")[2] > 0
    # the closure's forward passes were not recorded as training activations
    t = dnntrace.load(path).select(kind="activation", module="0", step=2)
    assert t.column("calls").to_pylist() == [1]


def test_trajectory_and_landscape_share_one_frame(tmp_path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = str(tmp_path / "r.arrow")
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y)

    with dnntrace.enable(
        model, path, extensions=[SP.Trajectory(seed=5, pca_snapshots=4)], host_buffers=64
    ):
        for _ in range(12):
            opt.zero_grad()
            loss_fn(model).backward()
            opt.step()
    traj = _rows(path, "trajectory")
    assert sorted(s for s, _, _ in traj) == list(range(12))
    assert {t for _, _, t in traj} == {"random:5"}
    t = dnntrace.load(path).select(kind="trajectory_pca")
    pca = [np.asarray(v) for v in t.column("values").to_pylist()]
    # evenly spaced, bounded, then the end: the final weights, after step 11 (no step 12)
    assert [int(v[0]) for v in pca] == [0, 4, 8, 11]
    assert all(v.size == 3 for v in pca)
    out = str(tmp_path / "land.arrow")
    grid = SP.landscape(model, loss_fn, out, trace=path, steps=5, span=0.5, progress=False)
    # the grid's centre (final weights) is the last trajectory point, the centre loss the loss
    last = [v for (s, _, _), v in traj.items() if s == 11][0]
    # the last row was recorded before step 11's update; one more SGD step moved it a little
    assert np.abs(grid.center - last).max() < 0.5
    assert grid.loss[2, 2] == pytest.approx(loss_fn(model).item(), rel=1e-5)
    land = dnntrace.load(out)
    assert land.metadata["landscape"]["tensor"] == "random:5"
    ax = _rows(out, "landscape_axis")
    np.testing.assert_allclose(ax[(0, "", "x")], grid.xs, rtol=1e-6)
    rows = _rows(out, "landscape")
    np.testing.assert_allclose(rows[(4, "", "loss")], grid.loss[4], rtol=1e-6)
    # PCA directions saved next to the trace give a grid too
    grid2 = SP.landscape(
        model,
        loss_fn,
        str(tmp_path / "p.arrow"),
        trace=path,
        directions="pca",
        steps=3,
        progress=False,
    )
    assert np.isfinite(grid2.loss).all()
    np.testing.assert_allclose(grid2.center, pca[-1][1:], rtol=1e-4, atol=1e-6)  # final weights


def test_landscape_cli(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "landfactory.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))\n"
        "    x = torch.randn(16, 4)\n"
        "    return m, lambda model: model(x).pow(2).mean()\n"
    )
    monkeypatch.chdir(tmp_path)
    from dnntrace.cli import main

    out = str(tmp_path / "l.arrow")
    assert main(["landscape", "landfactory:make", "--out", out, "--steps", "3", "--seed", "2"]) == 0
    assert "3x3 grid" in capsys.readouterr().out
    t = dnntrace.load(out)
    assert t.select(kind="landscape").num_rows == 3
    assert t.metadata["landscape"]["tensor"] == "random:2"
    assert main(["landscape", "nosuchmodule:make", "--out", out]) == 2
    assert main(["landscape", "landfactory:make", "--out", out, "--trace", "missing.arrow"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "dnntrace landscape:" in err


def test_nan_weights_do_not_switch_spectral_tracing_off(tmp_path) -> None:
    """A NaN in the weights reaches every activation after it: the activation sketch leaves such
    rows out (counted) instead of failing in eigh, and tracing stays on, NaN counted."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    path = str(tmp_path / "n.arrow")
    g = torch.Generator().manual_seed(0)
    with dnntrace.enable(
        model, path, spectral={"full_every": 2, "sketch": {"every": 1, "ell": 8}}, host_buffers=64
    ) as tr:
        for step in range(4):
            if step == 2:
                with torch.no_grad():
                    model[2].weight[0, 0] = float("nan")
            opt.zero_grad()
            model(torch.randn(64, 12, generator=g)).sum().backward()
            opt.step()
    assert tr.stats()["disabled"] is None
    an = dnntrace.load(path).anomalies()
    assert an and an[0]["step"] == 2
    assert 3 in dnntrace.load(path).steps.tolist()
