"""Update ratios against an explicit copy; the gradient noise scale against known statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dnntrace.stats.dynamics import (
    NoiseScaleEMA,
    noise_scale_estimates,
    optimizer_updates,
    supports_exact_updates,
    update_norms,
)

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "nesterov": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, dampening=0.3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_foreach_off": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_updates_match_an_explicit_copy(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    opt = OPTIMIZERS[name](model.parameters())
    params = list(model.parameters())
    x = torch.randn(32, 8, dtype=torch.float64)
    for _ in range(4):  # several steps: momentum buffers and bias corrections matter
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        got = optimizer_updates(opt, params)
        assert got is not None
        for p, b, item in zip(params, before, got, strict=True):
            assert item is not None
            delta, w_before = item
            torch.testing.assert_close(w_before, b, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(delta, p.detach() - b, rtol=1e-7, atol=1e-12)
        dn, bn = update_norms(before, [p.detach() for p in params])
        ref = [
            np.linalg.norm((p.detach() - b).numpy()) for p, b in zip(params, before, strict=True)
        ]
        np.testing.assert_allclose(dn.numpy(), ref, rtol=1e-5)
        np.testing.assert_allclose(bn.numpy(), [np.linalg.norm(b.numpy()) for b in before], 1e-6)


def test_unsupported_optimizers_return_none() -> None:
    p = [nn.Parameter(torch.ones(3))]
    assert not supports_exact_updates(torch.optim.RMSprop(p))
    assert optimizer_updates(torch.optim.RMSprop(p), p) is None
    assert not supports_exact_updates(torch.optim.SGD(p, lr=0.1, maximize=True))
    assert supports_exact_updates(torch.optim.SGD(p, lr=0.1))


def test_noise_scale_estimator_is_unbiased() -> None:
    """Gradients g = G + noise with known |G|² and tr(Σ): averaged estimates recover both."""
    gen = torch.Generator().manual_seed(0)
    d, b_small, k = 200, 4, 8
    g_true = torch.randn(d, generator=gen, dtype=torch.float64) * 0.3
    sigma = 2.0  # per-example noise std per coordinate: tr(Σ) = d σ²
    g2s, ss = [], []
    for _ in range(400):
        per_ex = g_true + sigma * torch.randn(b_small * k, d, generator=gen, dtype=torch.float64)
        small = per_ex[:b_small].mean(0)
        big = per_ex.mean(0)
        g2, s = noise_scale_estimates(
            small.square().sum(), big.square().sum(), b_small, b_small * k
        )
        g2s.append(g2.item())
        ss.append(s.item())
    assert np.mean(g2s) == pytest.approx(g_true.square().sum().item(), rel=0.1)
    assert np.mean(ss) == pytest.approx(d * sigma**2, rel=0.05)


def test_noise_scale_ema_ratio() -> None:
    ema = NoiseScaleEMA(beta=0.5)
    r = ema.update(torch.tensor(2.0), torch.tensor(10.0))
    assert r.item() == pytest.approx(5.0)
    r = ema.update(torch.tensor(4.0), torch.tensor(10.0))
    assert r.item() == pytest.approx((0.5 * 5 + 0.5 * 10) / (0.5 * 1 + 0.5 * 4))
    with pytest.raises(ValueError):
        noise_scale_estimates(torch.tensor(1.0), torch.tensor(1.0), 4, 4)
