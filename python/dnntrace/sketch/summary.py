"""``Summary``: the statistics of one tensor (or of everything merged into one slot), numpy only.

Built from a slot's counts and moments rows (the native state) or from a trace row. Exact fields:
counts, finite min/max, sums (float64 with compensation). Derived: mean, var, std, l2, absmax, and
from the log-linear histogram quantiles, CDF and plotting histograms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from . import layout as L
from . import merge as M
from .layout import Layout


class Summary:
    """Statistics of the values merged into one slot.

    ``quantile(q)`` has relative accuracy ``2**-(k+1)`` for values inside the exponent window
    (0.78 % at k = 6): if the true quantile (inverted-CDF definition, NaN excluded) is 100, the
    answer lies in [99.22, 100.78]. Values outside the window, ±0 and ±Inf are counted exactly but
    placed only coarsely (underflow near 0, overflow at the finite min/max).
    """

    __slots__ = ("counts", "moments", "layout")

    def __init__(self, counts: np.ndarray, moments: np.ndarray, layout: Layout) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        moments = np.asarray(moments, dtype=np.float64)
        if counts.shape != (layout.width,):
            raise ValueError(
                f"counts row has {counts.shape} elements, layout {layout} needs ({layout.width},)"
            )
        if moments.shape != (L.NUM_MOMENTS,):
            raise ValueError(f"moments row must have {L.NUM_MOMENTS} elements, got {moments.shape}")
        self.counts = counts
        self.moments = moments
        self.layout = layout

    @classmethod
    def empty(cls, layout: Layout | None = None) -> Summary:
        layout = layout or Layout()
        return cls(np.zeros(layout.width, np.int64), M.empty_moments(), layout)

    @classmethod
    def merge_all(cls, items: Iterable[Summary]) -> Summary:
        """Statistics of every input together: one ``merge_rows`` over all of them (exact
        counts, compensated sums). Raises ``ValueError`` when empty or the layouts differ."""
        parts = list(items)
        if not parts:
            raise ValueError("Summary.merge_all: nothing to merge")
        layout = parts[0].layout
        for p in parts[1:]:
            if p.layout != layout:
                raise ValueError(
                    f"cannot merge summaries with different layouts: {layout} vs {p.layout}"
                )
        counts, moments = M.merge_rows(
            np.stack([p.counts for p in parts]), np.stack([p.moments for p in parts])
        )
        return cls(counts[0], moments[0], layout)

    # ---- exact fields -------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.counts[L.COUNT])

    @property
    def nan(self) -> int:
        return int(self.counts[L.NAN])

    @property
    def posinf(self) -> int:
        return int(self.counts[L.POSINF])

    @property
    def neginf(self) -> int:
        return int(self.counts[L.NEGINF])

    @property
    def zeros(self) -> int:
        return int(self.counts[L.ZEROS])

    @property
    def negatives(self) -> int:
        return int(self.counts[L.NEGATIVES])

    @property
    def calls(self) -> int:
        return int(self.counts[L.CALLS])

    @property
    def underflow(self) -> tuple[int, int]:
        """(negative, positive) finite non-zero values below 2**emin in magnitude."""
        return int(self.counts[L.UNDER_NEG]), int(self.counts[L.UNDER_POS])

    @property
    def overflow(self) -> tuple[int, int]:
        """(negative, positive) finite values at or above 2**(emin+octaves) in magnitude."""
        return int(self.counts[L.OVER_NEG]), int(self.counts[L.OVER_POS])

    @property
    def finite(self) -> int:
        return int(M.finite_of_counts(self.counts))

    @property
    def sum(self) -> float:
        return float(self.moments[L.SUM] + self.moments[L.SUM_COMP])

    @property
    def sumsq(self) -> float:
        return float(self.moments[L.SUMSQ] + self.moments[L.SUMSQ_COMP])

    @property
    def min(self) -> float:
        return float(self.moments[L.MIN]) if self.finite else math.nan

    @property
    def max(self) -> float:
        return float(self.moments[L.MAX]) if self.finite else math.nan

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.finite else math.nan

    @property
    def mean(self) -> float:
        return float(M.mean(self.sum, self.finite))

    @property
    def var(self) -> float:
        """Population variance of the finite values (``merge.variance``, compensation folded
        in; NaN when the sums overflowed)."""
        m = self.moments
        return float(M.variance(m[L.SUM], m[L.SUMSQ], self.finite, m[L.SUM_COMP], m[L.SUMSQ_COMP]))

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.finite else math.nan

    @property
    def l2(self) -> float:
        return math.sqrt(self.sumsq)

    @property
    def hist(self) -> np.ndarray:
        """The histogram part of the counts row, in ascending bucket order."""
        return self.counts[L.HEADER :]

    # ---- sketch queries -----------------------------------------------------------------
    def _cells(self) -> tuple[np.ndarray, np.ndarray]:
        """All non-NaN values as (count, representative) cells in ascending value order."""
        lay = self.layout
        p = lay.per_sign
        c = self.counts
        rep = lay.representatives()
        lo_finite, hi_finite = self.min, self.max
        tiny = math.ldexp(1.0, lay.emin - 1)
        counts = np.concatenate(
            [
                [c[L.NEGINF], c[L.OVER_NEG]],
                c[L.HEADER : L.HEADER + p],
                [c[L.UNDER_NEG], c[L.ZEROS], c[L.UNDER_POS]],
                c[L.HEADER + p :],
                [c[L.OVER_POS], c[L.POSINF]],
            ]
        )
        values = np.concatenate(
            [
                [-math.inf, lo_finite],
                rep[:p],
                [-tiny, 0.0, tiny],
                rep[p:],
                [hi_finite, math.inf],
            ]
        )
        if self.finite:
            finite = np.isfinite(values)
            values[finite] = np.clip(values[finite], lo_finite, hi_finite)
        return counts, values

    def quantile(self, q: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """Value at quantile ``q`` (inverted CDF over the non-NaN values); NaN when empty."""
        qa = np.asarray(q, dtype=np.float64)
        if np.any((qa < 0) | (qa > 1)) or np.any(np.isnan(qa)):
            raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
        counts, values = self._cells()
        n = int(counts.sum())
        if n == 0:
            out = np.full(qa.shape, math.nan)
        else:
            cum = np.cumsum(counts)
            rank = np.maximum(np.ceil(qa * n), 1).astype(np.int64)  # 1-based rank
            idx = np.searchsorted(cum, rank, side="left")
            out = values[idx]
        return float(out) if out.ndim == 0 else out

    def cdf(self, v: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """Fraction of the non-NaN values <= ``v`` (linear inside a histogram bucket)."""
        va = np.asarray(v, dtype=np.float64)
        lay = self.layout
        lo, hi = lay.bucket_bounds()
        h = self.hist.astype(np.float64)
        c = self.counts
        n = self.count - self.nan
        if n == 0:
            out = np.full(va.shape, math.nan)
            return float(out) if out.ndim == 0 else out
        flat = va.reshape(-1)
        res = np.empty(flat.shape)
        for i, x in enumerate(flat):
            frac = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
            tot = float((h * frac).sum())
            tot += c[L.NEGINF] if x >= -math.inf else 0
            tot += c[L.OVER_NEG] if x >= self.min else 0
            tot += c[L.UNDER_NEG] if x >= 0 else 0
            tot += c[L.ZEROS] if x >= 0 else 0
            tot += c[L.UNDER_POS] if x >= math.ldexp(1.0, lay.emin) else 0
            tot += c[L.OVER_POS] if x >= self.max and c[L.OVER_POS] else 0
            tot += c[L.POSINF] if x >= math.inf else 0
            res[i] = tot / n
        out = res.reshape(va.shape)
        return float(out) if out.ndim == 0 else out

    def histogram(
        self, bins: str | int = "log", range: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(edges, counts)`` for plotting.

        ``bins="log"``: the native log-linear buckets spanning the non-empty ones (zeros,
        underflow and ±Inf are not in it: see ``zeros``, ``underflow``, ``posinf``).
        ``bins=n``: ``n`` linear bins over ``range`` (default ``[min, max]``); each native bucket's
        count is spread uniformly over its width, zeros and underflow go to the bin holding 0.
        """
        lay = self.layout
        h = self.hist
        if isinstance(bins, str):
            if bins != "log":
                raise ValueError(f"bins must be 'log' or an int, got {bins!r}")
            nz = np.flatnonzero(h)
            if nz.size == 0:
                return np.zeros(0), np.zeros(0, np.int64)
            a, b = int(nz[0]), int(nz[-1]) + 1
            lo, hi = lay.bucket_bounds()
            edges = np.concatenate([lo[a:b], hi[b - 1 : b]])
            return edges, h[a:b].copy()
        n_bins = int(bins)
        if n_bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if range is None:
            if not self.finite:
                return np.linspace(0, 1, n_bins + 1), np.zeros(n_bins)
            range = (self.min, self.max)
        r0, r1 = float(range[0]), float(range[1])
        if not r1 > r0:
            r1 = r0 + (abs(r0) or 1.0) * 1e-9
        edges = np.linspace(r0, r1, n_bins + 1)
        lo, hi = lay.bucket_bounds()
        lo = np.maximum(lo, self.min) if self.finite else lo
        hi = np.minimum(hi, self.max) if self.finite else hi
        out = np.zeros(n_bins)
        nz = np.flatnonzero(h)
        for bkt in nz:
            a, b = lo[bkt], hi[bkt]
            if b <= a:
                x = a
                i = np.searchsorted(edges, x, side="right") - 1
                if 0 <= i < n_bins or x == r1:
                    out[min(i, n_bins - 1)] += h[bkt]
                continue
            ov = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None)
            out += h[bkt] * ov / (b - a)
        # Values outside the window are known only coarsely: place each group at one point of
        # the interval it must lie in (as quantile() does), if that point is inside the range.
        tiny = math.ldexp(1.0, lay.emin)
        under_neg, under_pos = self.underflow
        over_neg, over_pos = self.overflow
        points: list[tuple[float, int]] = [(0.0, self.zeros)]
        if self.finite:
            points += [
                (min(max(tiny / 2, self.min), min(tiny, self.max)), under_pos),
                (max(min(-tiny / 2, self.max), max(-tiny, self.min)), under_neg),
                (self.max, over_pos),
                (self.min, over_neg),
            ]
        for x, c in points:
            if c and r0 <= x <= r1:
                i = min(int(np.searchsorted(edges, x, side="right") - 1), n_bins - 1)
                out[i] += c
        return edges, out

    def merge(self, other: Summary) -> Summary:
        """Statistics of both inputs together (``merge_rows``); exact for counts and the
        histogram, compensated sums."""
        return Summary.merge_all((self, other))

    __add__ = merge

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Summary):
            return NotImplemented
        return (
            self.layout == other.layout
            and np.array_equal(self.counts, other.counts)
            and np.array_equal(self.moments, other.moments)
        )

    def as_dict(self) -> dict[str, float | int]:
        return {
            name: getattr(self, name)
            for name in (
                "count nan posinf neginf zeros negatives min max mean var std l2 absmax".split()
            )
        }

    def __repr__(self) -> str:
        d = self.as_dict()
        inner = ", ".join(
            f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()
        )
        return f"Summary({inner}, k={self.layout.k})"
