"""Spectral statistics of weight matrices and activations.

- ``PowerIteration``: the top singular value of many matrices, one warm-started power-iteration
  step per call, on the device, without a host sync; with the Frobenius norm (one
  ``torch._foreach_norm`` over all matrices) it gives the stable rank ``‖W‖F² / σ₁²``.
- ``esd`` and ``fit_power_law``: the empirical spectral density of ``WᵀW`` (squared singular
  values) and its power-law exponent ``alpha`` with the Kolmogorov-Smirnov distance, fitted as
  Clauset, Shalizi & Newman (2009) prescribe (maximum likelihood for ``alpha`` above each
  candidate ``xmin``, the ``xmin`` minimising the KS distance) and as Martin & Mahoney (2019,
  2021, "heavy-tailed self-regularization") apply it to weight matrices. NumPy, for a background
  thread.
- ``FrequentDirections``: Ghashami, Liberty, Phillips & Woodruff (2016) sketch of a stream of
  feature rows, on the device.
- ``rankme``: the effective rank of Garrido, Balestriero, Najman & LeCun (2023).

Matrices: ``Linear`` weights as they are (out × in), convolution kernels as out × (in·kh·kw),
embeddings as (num × dim); see ``as_matrix``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# ---- matrices -------------------------------------------------------------------------------


def as_matrix(w: Tensor) -> Tensor | None:
    """The 2-D view of a weight (out × rest), or None for vectors and scalars."""
    if w.dim() < 2 or w.numel() == 0:
        return None
    return w.reshape(w.shape[0], -1)


# ---- top singular value, stable rank -----------------------------------------------------------


class PowerIteration:
    """Warm-started power iteration for the top singular value of a fixed list of matrices.

    Each ``step()`` does one iteration per matrix (``u = Wv/‖Wv‖``, ``v = Wᵀu``,
    ``σ = ‖v‖``, ``v ← v/σ``): two mat-vecs per matrix, the normalisations batched across all
    matrices with ``torch._foreach_*``; everything stays on the device (no ``.item()``). The
    estimate ``σ = ‖Wᵀu‖`` never exceeds σ₁ and, warm-started from the previous right vector
    while the weights change slowly, tracks it: DESIGN.md §4 measured 0.08 % after 50 steps even
    at σ₂/σ₁ = 0.998. The first call does ``warmup`` iterations from a seeded random start.

    ``step()`` returns ``(sigma_max, frobenius)``: float32 tensors of shape ``[n]``.
    """

    def __init__(
        self, matrices: Sequence[Tensor], *, warmup: int = 10, iters: int = 1, seed: int = 0
    ) -> None:
        self.matrices = list(matrices)
        self.warmup = warmup
        self.iters = iters
        self._v: list[Tensor] | None = None
        self._seed = seed

    def _mats(self) -> list[Tensor]:
        out = []
        for w in self.matrices:
            m = as_matrix(w.detach())
            if m is None:
                raise ValueError(f"PowerIteration: expected matrices, got shape {tuple(w.shape)}")
            out.append(m if m.dtype in (torch.float32, torch.float64) else m.float())
        return out

    @torch.no_grad()
    def step(self) -> tuple[Tensor, Tensor]:
        mats = self._mats()
        if not mats:
            z = torch.zeros(0)
            return z, z
        iters = self.iters
        if self._v is None:
            g = torch.Generator(device="cpu").manual_seed(self._seed)
            self._v = [
                torch.randn(m.shape[1], generator=g, dtype=m.dtype).to(m.device) for m in mats
            ]
            self._v = torch._foreach_div(self._v, torch._foreach_norm(self._v))
            iters = max(iters, self.warmup)
        vs = self._v
        sig: list[Tensor] = []
        for _ in range(iters):
            us = [m @ v for m, v in zip(mats, vs, strict=True)]
            un = torch._foreach_norm(us)
            torch._foreach_add_(un, 1e-30)  # a zero matrix keeps a zero vector, not NaN
            us = torch._foreach_div(us, un)
            vs = [m.T @ u for m, u in zip(mats, us, strict=True)]
            sig = torch._foreach_norm(vs)
            vs = torch._foreach_div(vs, torch._foreach_add(sig, 1e-30))
        self._v = vs
        sigma = torch.stack(sig).float()
        fro = torch.stack(torch._foreach_norm(mats)).float()
        return sigma, fro


def stable_rank(sigma_max: Tensor, frobenius: Tensor) -> Tensor:
    """‖W‖F² / σ₁² (Rudelson & Vershynin 2007): 1 for rank one, min(m, n) for an orthogonal W."""
    return (frobenius * frobenius) / (sigma_max * sigma_max).clamp_min(1e-30)


# ---- full spectrum, ESD and its power-law fit ------------------------------------------------


@dataclass(frozen=True)
class PowerLawFit:
    """Continuous power law p(x) ∝ x^-alpha on [xmin, ∞), fitted to ``n_tail`` values."""

    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int


def esd(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of ``WᵀW`` (the squared singular values of the 2-D view), descending."""
    a = np.asarray(w, dtype=np.float64)
    a = a.reshape(a.shape[0], -1)
    s = np.linalg.svd(a, compute_uv=False)
    return s * s


def fit_power_law(x: np.ndarray, *, min_tail: int = 10, xmin: float | None = None) -> PowerLawFit:
    """Clauset, Shalizi & Newman (2009) fit of a continuous power law to the positive ``x``.

    For each candidate ``xmin`` (each distinct value leaving at least ``min_tail`` values at or
    above it) the maximum-likelihood exponent is ``alpha = 1 + n / Σ ln(x_i / xmin)`` (their eq.
    3.1) and the KS distance is ``max |S(x) − P(x)|`` between the tail's empirical CDF and
    ``P(x) = 1 − (x / xmin)^(1 − alpha)``; the fit with the smallest KS distance wins. With
    ``xmin`` given, only that cut is fitted. Vectorised in O(n²) memory-bounded chunks: fine for
    the ≤ a few thousand eigenvalues of a layer. Returns NaNs when fewer than ``min_tail``
    positive values are left.
    """
    v = np.sort(np.asarray(x, dtype=np.float64).reshape(-1))
    v = v[np.isfinite(v) & (v > 0)]
    n_all = v.size
    nan = PowerLawFit(math.nan, math.nan, math.nan, 0)
    if n_all < min_tail:
        return nan
    logs = np.log(v)
    # suffix sums of log x: sum over v[i:]
    suffix = np.concatenate([np.cumsum(logs[::-1])[::-1], [0.0]])
    if xmin is not None:
        starts = np.array([int(np.searchsorted(v, xmin, side="left"))])
        if n_all - starts[0] < min_tail:
            return nan
    else:
        # first index of each distinct value, leaving at least min_tail values
        first = np.flatnonzero(np.concatenate([[True], v[1:] != v[:-1]]))
        starts = first[n_all - first >= min_tail]
        if starts.size == 0:
            return nan
    best = (math.inf, math.nan, math.nan, 0)
    chunk = max(1, 4_000_000 // max(n_all, 1))
    for c0 in range(0, starts.size, chunk):
        idx = starts[c0 : c0 + chunk]
        n = (n_all - idx).astype(np.float64)
        xm = v[idx] if xmin is None else np.full(idx.size, float(xmin))
        denom = suffix[idx] - n * np.log(xm)
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = 1.0 + n / denom
        # KS over each tail: empirical CDF steps (j / n, (j + 1) / n) at tail value j
        j = np.arange(n_all)[None, :] - idx[:, None]  # position in the tail, < 0 outside
        inside = j >= 0
        ratio = np.where(inside, v[None, :] / xm[:, None], 1.0)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            model = 1.0 - ratio ** (1.0 - alpha[:, None])
        lo = np.abs(model - j / n[:, None])
        hi = np.abs(model - (j + 1) / n[:, None])
        d = np.where(inside, np.maximum(lo, hi), -np.inf).max(axis=1)
        d = np.where(np.isfinite(alpha) & (alpha > 1), d, np.inf)
        k = int(np.argmin(d))
        if d[k] < best[0]:
            best = (float(d[k]), float(alpha[k]), float(xm[k]), int(n[k]))
    if not math.isfinite(best[0]):
        return nan
    return PowerLawFit(alpha=best[1], xmin=best[2], ks_distance=best[0], n_tail=best[3])


# ---- activations: Frequent Directions and RankMe ---------------------------------------------


class FrequentDirections:
    """Frequent Directions sketch (Ghashami, Liberty, Phillips & Woodruff 2016) of rows in R^d.

    Keeps ``B`` with at most ``2ℓ`` rows such that, for the stream ``A`` of all rows inserted and
    every ``k < ℓ``::

        0 ⪯ AᵀA − BᵀB   and   ‖AᵀA − BᵀB‖₂ ≤ ‖A − A_k‖F² / (ℓ − k)

    (``A_k`` the best rank-k approximation; with k = 0 the bound is ‖A‖F²/ℓ). Rows are buffered
    and, when the buffer would exceed ``2ℓ`` rows, the buffer plus the new block are shrunk at
    once: with ``λ`` the eigenvalues of ``CᵀC`` (C = [B; block]) and ``δ = λ_ℓ`` (the ℓ-th
    largest), ``B ← diag(√max(λ − δ, 0)) Vᵀ`` over the top ℓ. Each shrink removes at least
    ``ℓ·δ`` of squared Frobenius mass while adding at most ``δ`` to the spectral error, which is
    the whole proof of the bound, for blocks of any size. A block with more rows than columns is
    shrunk through its ``d × d`` Gram matrix (one GEMM + one ``eigh``), else by an SVD of ``C``.

    Everything is a device tensor. On CUDA the ``eigh``/``svd`` of a shrink synchronise the
    device with the host (as ``torch.linalg`` documents), so insert at sampled steps only.
    """

    def __init__(
        self, d: int, ell: int = 32, *, device: torch.device | str = "cpu", dtype=torch.float32
    ) -> None:
        if ell < 1 or d < 1:
            raise ValueError(f"FrequentDirections: need ell >= 1 and d >= 1, got {ell}, {d}")
        self.d = d
        self.ell = ell
        self.dtype = dtype
        self.device = torch.device(device)
        self._b = torch.zeros(0, d, device=self.device, dtype=dtype)
        self.rows_seen = 0
        self.shrinkage = torch.zeros((), device=self.device, dtype=torch.float64)  # Σ δ
        # rows left out (as zero rows) for a NaN/Inf; a device tensor
        self.nonfinite_rows = torch.zeros((), device=self.device, dtype=torch.int64)

    @property
    def sketch(self) -> Tensor:
        """The sketch B (≤ 2ℓ rows)."""
        return self._b

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Adds the rows of ``rows`` (n × d; leading dims are flattened)."""
        a = rows.detach().reshape(-1, self.d).to(self.dtype)
        if a.shape[0] == 0:
            return
        # a row holding NaN/Inf would poison every later shrink (eigh fails on NaN): it enters
        # as a zero row (adds nothing to AᵀA) and is counted, without a host sync
        ok = torch.isfinite(a).all(dim=1, keepdim=True)
        a = torch.where(ok, a, torch.zeros((), device=a.device, dtype=a.dtype))
        self.nonfinite_rows += a.shape[0] - ok.sum()
        self.rows_seen += a.shape[0]
        c = torch.cat([self._b, a]) if self._b.shape[0] else a
        if c.shape[0] <= 2 * self.ell:
            self._b = c
            return
        self._b = self._shrink(c)

    def _shrink(self, c: Tensor) -> Tensor:
        ell = self.ell
        if c.shape[0] > c.shape[1]:
            g = (c.T @ c).double()
            lam, vec = torch.linalg.eigh(g)  # ascending
            lam = lam.flip(0).clamp_min(0)
            vec = vec.flip(1)
        else:
            _, s, vh = torch.linalg.svd(c.double(), full_matrices=False)
            lam = s * s
            vec = vh.T
        if lam.shape[0] <= ell:
            return c  # rank ≤ ℓ: nothing to shrink (d ≤ ℓ)
        delta = lam[ell - 1]
        self.shrinkage += delta
        keep = (lam[:ell] - delta).clamp_min(0).sqrt()
        return (keep[:, None] * vec[:, :ell].T).to(self.dtype)

    @torch.no_grad()
    def eigenvalues(self, k: int | None = None) -> Tensor:
        """Top ``k`` (default ℓ) eigenvalues of BᵀB, descending, float32, on the device: the
        top eigenvalues of the stream's (uncentred) second-moment matrix AᵀA, each too low by at
        most the bound above. Divide by ``rows_seen`` for a per-row covariance."""
        k = self.ell if k is None else k
        if self._b.shape[0] == 0:
            return torch.zeros(k, device=self.device)
        s = torch.linalg.svdvals(self._b.double())
        lam = (s * s).float()
        if lam.shape[0] < k:
            lam = torch.cat([lam, lam.new_zeros(k - lam.shape[0])])
        return lam[:k]

    def reset(self) -> None:
        self._b = self._b[:0]
        self.rows_seen = 0
        self.shrinkage.zero_()
        self.nonfinite_rows.zero_()


def rankme(z: np.ndarray | Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, eq. 1): ``exp(−Σ p_k log p_k)`` with
    ``p_k = σ_k / ‖σ‖₁ + ε`` over the singular values σ of the rows ``z`` (n × d). Between 1 and
    min(n, d); it cannot exceed the number of rows, so use a row sample of ≥ d rows (Garrido et
    al. use 25,600)."""
    a = z.detach().double().cpu().numpy() if isinstance(z, Tensor) else np.asarray(z, np.float64)
    a = a.reshape(-1, a.shape[-1])
    if a.size == 0:
        return math.nan
    s = np.linalg.svd(a, compute_uv=False)
    total = s.sum()
    if total <= 0 or not np.isfinite(total):
        return math.nan
    p = s / total + eps
    return float(np.exp(-(p * np.log(p)).sum()))


__all__ = [
    "FrequentDirections",
    "PowerIteration",
    "PowerLawFit",
    "as_matrix",
    "esd",
    "fit_power_law",
    "rankme",
    "stable_rank",
]
