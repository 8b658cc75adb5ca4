"""Loss-landscape directions, trajectory projection and 2-D loss grids (Li, Xu, Taylor, Studer &
Goldstein 2018, "Visualizing the Loss Landscape of Neural Nets").

- ``random_directions``: Gaussian directions, filter-normalised (each filter ``d_f`` of a ≥2-D
  parameter rescaled to the norm of the reference weights' filter, ``d_f ← d_f/‖d_f‖ · ‖θ_f‖``;
  1-D parameters, biases and norm scales, get a zero direction, as Li et al. do). They are
  regenerated from a seed and the reference filter norms, so nothing large is stored.
- ``pca_directions``: the top principal directions of ``θ_i − θ_n`` over a bounded set of
  parameter snapshots (Li et al. §7, for plotting optimisation trajectories).
- ``Projector``: coordinates of the parameter vector in the span of the directions, by least
  squares (``c = (DᵀD)⁻¹ Dᵀθ``; the small Gram inverse is computed once), on the device.
- ``evaluate_grid``: the loss at ``θ_c + α d₁ + β d₂`` on a grid; grid point (α, β) has the
  coordinates ``c(θ_c) + (α, β)``, the same frame as the projected trajectory.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

Direction = list[Tensor]  # one tensor per parameter, same shapes


def filter_norms(params: Sequence[Tensor]) -> list[Tensor | None]:
    """Per-filter (dim 0) norms of each ≥2-D parameter; ``None`` for 1-D ones."""
    return [
        torch.linalg.vector_norm(p.detach().reshape(p.shape[0], -1).double(), dim=1).float()
        if p.dim() >= 2
        else None
        for p in params
    ]


@torch.no_grad()
def random_directions(
    params: Sequence[Tensor],
    seed: int,
    n: int = 2,
    *,
    norms: Sequence[Tensor | None] | None = None,
) -> list[Direction]:
    """``n`` filter-normalised Gaussian directions (Li et al. 2018, §4), from ``seed`` alone.

    The Gaussian draws come from a CPU generator in parameter order (direction 0 for every
    parameter, then direction 1, ...), so the same seed and shapes give the same directions on
    any device. ``norms`` are the reference filter norms (default: of ``params`` now)."""
    ref = list(norms) if norms is not None else filter_norms(params)
    if len(ref) != len(params):
        raise ValueError(f"random_directions: {len(ref)} norms for {len(params)} parameters")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    out: list[Direction] = []
    for _ in range(n):
        dirs = []
        for p, fn in zip(params, ref, strict=True):
            if p.dim() < 2 or fn is None:
                dirs.append(torch.zeros_like(p))
                continue
            d = torch.randn(p.shape, generator=g, dtype=torch.float32)
            d2 = d.reshape(p.shape[0], -1)
            scale = fn.to(torch.float32).cpu() / (torch.linalg.vector_norm(d2, dim=1) + 1e-12)
            dirs.append((d2 * scale[:, None]).reshape(p.shape).to(p.device, p.dtype))
        out.append(dirs)
    return out


@torch.no_grad()
def pca_directions(
    snapshots: Sequence[Sequence[Tensor]], n: int = 2
) -> tuple[list[Direction], np.ndarray]:
    """Top ``n`` principal directions of ``θ_i − θ_last`` over the snapshots (Li et al. §7),
    unit norm, with the fraction of variance each explains. Computed through the small
    ``k × k`` Gram matrix of the k snapshots, in float64 on the snapshots' device."""
    if len(snapshots) < 2:
        raise ValueError("pca_directions: need at least 2 snapshots")
    last = snapshots[-1]
    rows = torch.stack(
        [
            torch.cat([(a - b).double().reshape(-1) for a, b in zip(s, last, strict=True)])
            for s in snapshots[:-1]
        ]
    )
    gram = rows @ rows.T
    lam, vec = torch.linalg.eigh(gram)
    lam, vec = lam.flip(0), vec.flip(1)
    n = min(n, rows.shape[0])
    comps = vec[:, :n].T @ rows  # n × P, norm² = λ
    comps = comps / torch.linalg.vector_norm(comps, dim=1, keepdim=True).clamp_min(1e-30)
    total = lam.clamp_min(0).sum()
    explained = (lam[:n].clamp_min(0) / total).cpu().numpy() if total > 0 else np.zeros(n)
    out: list[Direction] = []
    for k in range(n):
        i = 0
        d = []
        for t in last:
            d.append(comps[k, i : i + t.numel()].reshape(t.shape).to(t.dtype))
            i += t.numel()
        out.append(d)
    return out, explained


class Projector:
    """Coordinates of parameters in the span of fixed directions: ``c = (DᵀD)⁻¹ Dᵀθ``."""

    def __init__(self, directions: Sequence[Direction]) -> None:
        self.directions = [list(d) for d in directions]
        k = len(self.directions)
        gram = torch.zeros(k, k, dtype=torch.float64)
        for i in range(k):
            for j in range(i, k):
                gram[i, j] = gram[j, i] = float(_dot(self.directions[i], self.directions[j]))
        self._inv = torch.linalg.pinv(gram)
        dev = self.directions[0][0].device if self.directions and self.directions[0] else "cpu"
        self._inv_dev = self._inv.to(dev)

    @torch.no_grad()
    def __call__(self, params: Sequence[Tensor]) -> Tensor:
        """Coordinates (float64 ``[k]``) on the parameters' device, no sync."""
        ps = [p.detach() for p in params]
        dots = torch.stack([_dot(d, ps) for d in self.directions])
        return self._inv_dev @ dots


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    parts = [
        torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b, strict=True)
    ]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)


@dataclass
class LandscapeGrid:
    """Loss on ``θ_c + α d₁ + β d₂``: ``loss[j, i]`` at ``(alphas[i], betas[j])``."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    center: np.ndarray  # coordinates of θ_c in the directions' frame
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def xs(self) -> np.ndarray:
        """Absolute coordinates along d₁ (the trajectory's frame)."""
        return self.center[0] + self.alphas

    @property
    def ys(self) -> np.ndarray:
        return self.center[1] + self.betas


class _Bar:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.n, self.t0 = total, enabled, 0, time.perf_counter()

    def update(self) -> None:
        self.n += 1
        if not self.enabled:
            return
        frac = self.n / self.total
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac else 0.0
        bar = "#" * int(30 * frac)
        sys.stderr.write(
            f"\rlandscape [{bar:<30}] {self.n}/{self.total} {el:5.1f}s eta {eta:5.1f}s"
        )
        if self.n == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@torch.no_grad()
def evaluate_grid(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor | float],
    directions: Sequence[Direction],
    *,
    steps: int = 21,
    span: float = 1.0,
    progress: bool = True,
    params: Sequence[Tensor] | None = None,
) -> LandscapeGrid:
    """Evaluates ``loss_fn(model)`` at ``θ_c + α d₁ + β d₂`` for α, β in ``linspace(-span, span,
    steps)`` (``θ_c``: the parameters now), then restores them exactly. ``params`` defaults to
    ``model.parameters()`` in order, matching the directions. ``steps²`` loss evaluations."""
    if len(directions) < 2:
        raise ValueError("evaluate_grid: need two directions")
    if steps < 2:
        raise ValueError(f"evaluate_grid: steps must be >= 2, got {steps}")
    ps = list(params) if params is not None else list(model.parameters())
    d1, d2 = directions[0], directions[1]
    if len(d1) != len(ps) or any(a.shape != b.shape for a, b in zip(d1, ps, strict=True)):
        raise ValueError("evaluate_grid: the directions do not match the model's parameters")
    center = Projector(directions[:2])(ps).cpu().numpy()
    saved = [p.detach().clone() for p in ps]
    alphas = np.linspace(-span, span, steps)
    betas = np.linspace(-span, span, steps)
    loss = np.full((steps, steps), np.nan)
    bar = _Bar(steps * steps, progress)
    t0 = time.perf_counter()
    try:
        for j, b in enumerate(betas):
            for i, a in enumerate(alphas):
                for p, s, x, y in zip(ps, saved, d1, d2, strict=True):
                    p.copy_(s + float(a) * x + float(b) * y)
                v = loss_fn(model)
                loss[j, i] = float(v)
                bar.update()
    finally:
        for p, s in zip(ps, saved, strict=True):
            p.copy_(s)
    return LandscapeGrid(alphas, betas, loss, center, time.perf_counter() - t0)


__all__ = [
    "LandscapeGrid",
    "Projector",
    "evaluate_grid",
    "filter_norms",
    "pca_directions",
    "random_directions",
]
