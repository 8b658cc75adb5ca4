"""HVP power iteration and Hutchinson's trace on quadratics with a known Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dnntrace.stats.curvature import HVP, hutchinson_trace, top_hessian_eigenvalue


def _quadratic(eigs: np.ndarray, seed: int = 0) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((eigs.size, eigs.size)))
    h = (q * eigs) @ q.T
    return h, torch.from_numpy(h), torch.from_numpy(rng.standard_normal(eigs.size))


def test_hvp_is_the_hessian_times_v() -> None:
    h, ht, b = _quadratic(np.linspace(-1, 3, 12))
    x = nn.Parameter(torch.zeros(12, dtype=torch.float64))
    hvp = HVP(lambda: 0.5 * x @ ht @ x + b @ x, [x])
    v = torch.randn(12, dtype=torch.float64)
    np.testing.assert_allclose(hvp([v])[0].numpy(), h @ v.numpy(), rtol=1e-12)
    assert x.grad is None  # .grad is never touched


def test_top_eigenvalue_of_a_known_quadratic_split_over_two_parameters() -> None:
    eigs = np.concatenate([np.linspace(0.1, 2.0, 19), [5.0]])
    h, ht, b = _quadratic(eigs, seed=1)
    x1 = nn.Parameter(torch.randn(8, dtype=torch.float64))
    x2 = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def closure() -> torch.Tensor:
        x = torch.cat([x1, x2.reshape(-1)])
        return 0.5 * x @ ht @ x + b @ x + (x**2).sum() * 0  # quadratic: H is ht exactly

    res = top_hessian_eigenvalue(closure, [x1, x2], iters=200, tol=1e-10)
    assert res.converged
    assert res.eigenvalue == pytest.approx(np.linalg.eigvalsh(h).max(), rel=1e-6)
    vec = torch.cat([res.vector[0], res.vector[1].reshape(-1)]).numpy()
    top = np.linalg.eigh(h)[1][:, -1]
    assert abs(vec @ top) == pytest.approx(1.0, abs=1e-4)
    # warm start from the answer converges at once
    again = top_hessian_eigenvalue(closure, [x1, x2], v0=res.vector, tol=1e-8)
    assert again.iterations <= 3


def test_top_eigenvalue_negative_dominant() -> None:
    h, ht, _ = _quadratic(np.array([-4.0, 1.0, 0.5, 2.0]), seed=2)
    x = nn.Parameter(torch.ones(4, dtype=torch.float64))
    res = top_hessian_eigenvalue(lambda: 0.5 * x @ ht @ x, [x], iters=300, tol=1e-10)
    assert res.eigenvalue == pytest.approx(-4.0, rel=1e-5)


def test_hutchinson_trace_of_a_known_quadratic() -> None:
    eigs = np.linspace(0.5, 3.0, 30)
    h, ht, _ = _quadratic(eigs, seed=3)
    x = nn.Parameter(torch.zeros(30, dtype=torch.float64))
    tr, se = hutchinson_trace(lambda: 0.5 * x @ ht @ x, [x], samples=400)
    # Rademacher variance: 2 Σ_{i≠j} H_ij²; the estimate lies within 4 standard errors
    assert abs(tr - eigs.sum()) < 4 * se
    assert se < 0.1 * eigs.sum()


def test_top_eigenvalue_of_a_network_matches_the_dense_hessian() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    params = list(net.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        out, i = x, 0
        ws = []
        for s in shapes:
            n = int(np.prod(s))
            ws.append(flat[i : i + n].reshape(s))
            i += n
        out = torch.tanh(out @ ws[0].T + ws[1]) @ ws[2].T + ws[3]
        return ((out - y) ** 2).mean()

    dense = torch.autograd.functional.hessian(loss_of, flat0).numpy()
    ev = np.linalg.eigvalsh(dense)
    top = ev[np.argmax(np.abs(ev))]
    res = top_hessian_eigenvalue(lambda: ((net(x) - y) ** 2).mean(), params, iters=500, tol=1e-9)
    assert res.eigenvalue == pytest.approx(top, rel=1e-4)
