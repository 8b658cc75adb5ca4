"""Landscape directions, projection and grid against direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dnntrace.stats.landscape import (
    Projector,
    evaluate_grid,
    filter_norms,
    pca_directions,
    random_directions,
)


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))


def test_random_directions_are_filter_normalised_and_reproducible() -> None:
    m = _small()
    ps = list(m.parameters())
    d1, d2 = random_directions(ps, seed=3)
    again = random_directions(ps, seed=3)
    for a, b in zip(d1 + d2, again[0] + again[1], strict=True):
        assert torch.equal(a, b)
    other = random_directions(ps, seed=4)[0]
    assert not torch.equal(d1[0], other[0])
    for p, d in zip(ps, d1, strict=True):
        if p.dim() < 2:
            assert torch.count_nonzero(d) == 0  # biases: zero direction (Li et al.)
        else:
            np.testing.assert_allclose(
                d.norm(dim=1).numpy(), p.detach().norm(dim=1).numpy(), rtol=1e-5
            )
    # regenerated from the seed and stored filter norms after the weights changed
    norms = filter_norms(ps)
    with torch.no_grad():
        for p in ps:
            p.mul_(3.0)
    regen = random_directions(ps, seed=3, norms=norms)[0]
    for a, b in zip(d1, regen, strict=True):
        torch.testing.assert_close(a, b)


def test_projector_recovers_coordinates_in_the_span() -> None:
    m = _small()
    ps = [p.detach().clone() for p in m.parameters()]
    dirs = random_directions(ps, seed=0, n=3)
    proj = Projector(dirs)
    base = proj(ps)
    moved = [p + 0.3 * a - 1.2 * b + 0.5 * c for p, a, b, c in zip(ps, *dirs, strict=True)]
    np.testing.assert_allclose((proj(moved) - base).numpy(), [0.3, -1.2, 0.5], atol=1e-9)


def test_pca_directions_find_the_trajectory_plane() -> None:
    rng = np.random.default_rng(0)
    u = rng.standard_normal(40)
    u /= np.linalg.norm(u)
    w = rng.standard_normal(40)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    t = np.linspace(0, 1, 12)
    pts = [5 * a * u + 1 * np.sin(3 * a) * w for a in t]
    snaps = [[torch.from_numpy(p[:30].reshape(5, 6)), torch.from_numpy(p[30:])] for p in pts]
    dirs, explained = pca_directions(snaps, n=2)
    flat = [torch.cat([d[0].reshape(-1), d[1]]).numpy() for d in dirs]
    assert abs(flat[0] @ u) > 0.99
    basis = np.stack([u, w])
    assert np.linalg.norm(basis @ flat[1]) > 0.99  # second direction in the same plane
    assert explained[0] > explained[1] > 0 and explained.sum() == pytest.approx(1.0, abs=1e-9)


def test_evaluate_grid_matches_direct_evaluation_and_restores_weights() -> None:
    m = _small().double()
    x = torch.randn(20, 5, dtype=torch.float64)
    y = torch.randn(20, 2, dtype=torch.float64)

    def loss_fn(model: nn.Module) -> torch.Tensor:
        return ((model(x) - y) ** 2).mean()

    ps = list(m.parameters())
    before = [p.detach().clone() for p in ps]
    dirs = random_directions(ps, seed=1)
    grid = evaluate_grid(m, loss_fn, dirs, steps=5, span=0.5, progress=False)
    for p, b in zip(ps, before, strict=True):
        assert torch.equal(p.detach(), b)
    assert grid.loss.shape == (5, 5)
    # centre value is the loss now; one off-centre value recomputed by hand
    assert grid.loss[2, 2] == pytest.approx(loss_fn(m).item(), rel=1e-12)
    probe = _small().double()
    with torch.no_grad():
        for q, p, a, b in zip(probe.parameters(), ps, *dirs, strict=True):
            q.copy_(p + grid.alphas[4] * a + grid.betas[0] * b)
    assert grid.loss[0, 4] == pytest.approx(loss_fn(probe).item(), rel=1e-12)
    # grid coordinates are in the projector's frame
    np.testing.assert_allclose(grid.center, Projector(dirs)(ps).numpy())
    with pytest.raises(ValueError):
        evaluate_grid(m, loss_fn, dirs[:1], progress=False)
