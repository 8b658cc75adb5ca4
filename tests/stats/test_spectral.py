"""Spectral statistics against numpy/scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from dnntrace.stats.spectral import (
    FrequentDirections,
    PowerIteration,
    as_matrix,
    esd,
    fit_power_law,
    rankme,
    stable_rank,
)


def _with_gap(m: int, n: int, ratio: float, seed: int) -> np.ndarray:
    """An m × n matrix with singular values 1, ratio, ratio², ... (known spectrum)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    s = ratio ** np.arange(k)
    return (u[:, :k] * s) @ v[:, :k].T


def test_as_matrix_shapes() -> None:
    assert as_matrix(torch.zeros(5)) is None
    assert as_matrix(torch.zeros(4, 3)).shape == (4, 3)
    assert as_matrix(torch.zeros(8, 3, 5, 5)).shape == (8, 75)


@pytest.mark.parametrize("shape", [(64, 32), (16, 100), (1, 7), (8, 3, 3, 3)])
def test_power_iteration_matches_numpy_svd(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    pi = PowerIteration([w], warmup=300)
    sigma, fro = pi.step()
    ref = np.linalg.svd(w.reshape(shape[0], -1).numpy(), compute_uv=False)
    np.testing.assert_allclose(sigma.numpy(), ref[:1], rtol=1e-4)
    np.testing.assert_allclose(fro.numpy(), [np.sqrt((ref**2).sum())], rtol=1e-6)
    sr = stable_rank(sigma, fro)
    np.testing.assert_allclose(sr.numpy(), [(ref**2).sum() / ref[0] ** 2], rtol=1e-3)


def test_power_iteration_warm_start_tracks_drifting_weights() -> None:
    """One iteration per step, batched over several matrices, converges while W drifts."""
    ws = [torch.from_numpy(_with_gap(48, 32, 0.9, s)).float() for s in range(3)]
    pi = PowerIteration(ws, warmup=1)
    first, _ = pi.step()
    for _ in range(60):
        for w in ws:
            w.mul_(1.001)  # in place, as an optimizer updates a parameter
        sigma, _ = pi.step()
    expect = 1.001**60
    assert first.min().item() < 0.999  # one iteration from a random start is not converged
    np.testing.assert_allclose(sigma.numpy(), np.full(3, expect), rtol=2e-3)


def test_power_iteration_zero_matrix_is_finite() -> None:
    sigma, fro = PowerIteration([torch.zeros(4, 3)]).step()
    assert sigma.item() == 0.0 and fro.item() == 0.0


def test_esd_is_squared_singular_values() -> None:
    w = np.random.default_rng(0).standard_normal((30, 20))
    np.testing.assert_allclose(esd(w), np.linalg.eigvalsh(w.T @ w)[::-1], rtol=1e-10)


def _pareto(alpha: float, xmin: float, n: int, seed: int) -> np.ndarray:
    u = np.random.default_rng(seed).random(n)
    return xmin * (1 - u) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.0, 2.5, 4.0])
def test_power_law_fit_recovers_alpha(alpha: float) -> None:
    x = _pareto(alpha, 0.5, 4000, seed=int(alpha * 10))
    fit = fit_power_law(x)
    # the MLE's standard error is (alpha - 1) / sqrt(n) ≈ 0.02-0.05 here; xmin adds a little
    assert abs(fit.alpha - alpha) < 0.15, fit
    assert fit.ks_distance < 0.05


def test_power_law_fit_finds_the_tail_above_a_body() -> None:
    """Log-normal body below xmin = 2, power-law tail (alpha = 2.5) above: xmin is found."""
    rng = np.random.default_rng(3)
    body = np.exp(rng.normal(-0.5, 0.4, 3000))
    body = body[body < 2.0]
    x = np.concatenate([body, _pareto(2.5, 2.0, 1500, seed=4)])
    fit = fit_power_law(x)
    assert 1.5 < fit.xmin < 2.6, fit
    assert abs(fit.alpha - 2.5) < 0.2, fit


def test_power_law_fit_matches_scipy_at_fixed_xmin() -> None:
    x = _pareto(3.0, 1.0, 500, seed=7)
    fit = fit_power_law(x, xmin=1.0)
    b, _, _ = sps.pareto.fit(x, floc=0, fscale=1.0)  # Pareto shape b = alpha - 1
    assert fit.alpha == pytest.approx(b + 1, rel=1e-9)
    ks = sps.kstest(x, "pareto", args=(fit.alpha - 1, 0, 1.0)).statistic
    assert fit.ks_distance == pytest.approx(ks, rel=1e-9)
    assert fit.n_tail == 500


def test_power_law_fit_too_few_values_is_nan() -> None:
    fit = fit_power_law(np.array([1.0, 2.0, 3.0]))
    assert np.isnan(fit.alpha) and fit.n_tail == 0


@pytest.mark.parametrize("ell,block", [(8, 5), (16, 100), (32, 1)])
def test_frequent_directions_error_bound(ell: int, block: int) -> None:
    rng = np.random.default_rng(ell)
    n, d = 600, 48
    # decaying spectrum plus noise: the bound is informative for k > 0
    a = rng.standard_normal((n, 6)) @ rng.standard_normal((6, d)) * 3 + rng.standard_normal((n, d))
    fd = FrequentDirections(d, ell, dtype=torch.float64)
    for i in range(0, n, block):
        fd.update(torch.from_numpy(a[i : i + block]))
    b = fd.sketch.numpy()
    assert b.shape[0] <= 2 * ell
    diff = a.T @ a - b.T @ b
    err = np.linalg.norm(diff, 2)
    assert np.linalg.eigvalsh(diff).min() > -1e-6 * np.linalg.norm(a) ** 2  # AᵀA ⪰ BᵀB
    s = np.linalg.svd(a, compute_uv=False)
    for k in range(ell):
        tail = (s[k:] ** 2).sum()
        assert err <= tail / (ell - k) * (1 + 1e-9), (k, err, tail / (ell - k))
    assert fd.rows_seen == n
    # the reported top eigenvalues are within the error of the exact ones, and never above
    top = fd.eigenvalues(4).numpy()
    exact = s[:4] ** 2
    assert np.all(top <= exact * (1 + 1e-6))
    assert np.all(exact - top <= err * (1 + 1e-6) + 1e-6)


def test_frequent_directions_exact_when_rank_small() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 20))
    fd = FrequentDirections(20, 8, dtype=torch.float64)
    fd.update(torch.from_numpy(a))
    np.testing.assert_allclose(fd.sketch.numpy().T @ fd.sketch.numpy(), a.T @ a, atol=1e-8)
    fd.reset()
    assert fd.rows_seen == 0 and fd.sketch.shape[0] == 0


def test_frequent_directions_leaves_out_nonfinite_rows() -> None:
    """A row with NaN/Inf enters as a zero row and is counted: the sketch equals that of the
    finite rows alone (exact here: rank 3 < ell), and later shrinks still work."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 12))
    bad = a.copy()
    bad[[3, 17]] = np.nan
    bad[25, 4] = np.inf
    fd = FrequentDirections(12, 8, dtype=torch.float64)
    for i in range(0, 40, 10):  # blocks of 10 rows: several shrinks
        fd.update(torch.from_numpy(bad[i : i + 10]))
    good = np.delete(a, [3, 17, 25], axis=0)
    b = fd.sketch.numpy()
    assert np.isfinite(b).all()
    np.testing.assert_allclose(b.T @ b, good.T @ good, atol=1e-8)
    assert int(fd.nonfinite_rows) == 3 and fd.rows_seen == 40
    fd.reset()
    assert int(fd.nonfinite_rows) == 0


def test_rankme_reference_values() -> None:
    assert rankme(np.eye(10)) == pytest.approx(10, rel=1e-5)
    rank2 = np.random.default_rng(0).standard_normal((50, 2)) @ np.diag([1.0, 1.0]) @ np.eye(2, 8)
    assert 1.5 < rankme(rank2) <= 2.0 + 1e-6
    assert rankme(np.outer(np.ones(5), np.arange(1, 4))) == pytest.approx(1.0, abs=1e-4)
    z = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    s = np.linalg.svd(z.double().numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(z) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
