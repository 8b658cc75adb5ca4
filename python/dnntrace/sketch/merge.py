"""The one row merge, and the statistics every reader derives from a row's header.

A *state row* is a slot's counts row (``int64[width]``: header, then the log-linear histogram)
and its moments row (``float64[8]``: sum and its compensation, sum of squares and its
compensation, finite min, finite max; ``layout.py``). Merging rows is what a cross-rank merge
(``capture.distributed.RankMerge``), a merge of rank files when reading
(``storage.runs.RunSet.merged_table``) and a merge over steps or tensors (``Trace.summary``,
``Summary.merge``) all do, so they all call ``merge_rows``:

- counts and histograms add (int64: exact, in any order);
- min takes the minimum, max the maximum (exact, in any order);
- each sum is a (value, compensation) pair; pairs are added by a pairwise tree of TwoSum steps
  (Knuth, TAOCP vol. 2, 4.2.2; the compensated-summation idea of Kahan 1965 and Neumaier 1974)
  whose rounding errors accumulate in the compensation. The merged ``value + compensation``
  carries an error of about ``eps * sum(|x_i|)`` for any order of the rows, where a plain sum
  errs by up to ``log2(n) * eps * sum(|x_i|)`` (Higham 2002, 4.2).

The header statistics (finite count, mean, variance, RMS, L2 norm) are defined once, in
``finite_count``, ``mean``, ``variance``, ``rms``, ``l2``: ``Summary``, the trace writer and the
viewer's tables call these. Numpy only.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

from .layout import (
    COUNT,
    MAX,
    MIN,
    NAN,
    NEGINF,
    NUM_MOMENTS,
    POSINF,
    SUM,
    SUM_COMP,
    SUMSQ,
    SUMSQ_COMP,
)

# (value, compensation) fields of the moments row
SUM_PAIRS = ((SUM, SUM_COMP), (SUMSQ, SUMSQ_COMP))
_HI = np.array([SUM, SUMSQ])
_LO = np.array([SUM_COMP, SUMSQ_COMP])

A = TypeVar("A")


def empty_moments(n: int | None = None) -> np.ndarray:
    """Moments of nothing: zero sums, min ``+inf``, max ``-inf`` (``float64[8]``, or
    ``[n, 8]``)."""
    m = np.zeros((NUM_MOMENTS,) if n is None else (n, NUM_MOMENTS))
    m[..., MIN] = np.inf
    m[..., MAX] = -np.inf
    return m


def two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth's TwoSum, no
    branch on magnitudes); ``e = 0`` where ``s`` is not finite (an overflowed or NaN sum has no
    error term to carry)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = a + b
        bb = s - a
        e = (a - (s - bb)) + (b - bb)
    return s, np.where(np.isfinite(s), e, 0.0)


def _group_starts(group: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted ``group``."""
    if group.size == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))


def _pairwise(hi: np.ndarray, lo: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, ...]:
    """Compensated sums of ``(hi, lo)`` rows (``[n, P]``) per run of ``group`` (sorted): at each
    level the 2j-th and (2j+1)-th rows of a run are combined by TwoSum, their compensations and
    the rounding error added into the compensation; ``log2(longest run)`` vectorised levels."""
    while True:
        starts = _group_starts(group)
        sizes = np.diff(np.append(starts, group.size))
        if sizes.size == 0 or sizes.max() <= 1:
            return hi, lo, group
        pos = np.arange(group.size) - np.repeat(starts, sizes)
        keep = pos % 2 == 0
        partner = keep & (pos + 1 < np.repeat(sizes, sizes))
        i = np.flatnonzero(partner)
        s, e = two_sum(hi[i], hi[i + 1])
        hi = hi.copy()
        lo = lo.copy()
        hi[i] = s
        lo[i] = e + lo[i] + lo[i + 1]  # the order of Summary.merge before: bit-identical
        hi, lo, group = hi[keep], lo[keep], group[keep]


def merge_rows(
    counts: np.ndarray,
    moments: np.ndarray,
    group: np.ndarray | None = None,
    ngroups: int | None = None,
    *,
    hist: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    width: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge state rows: ``counts int64[n, w]``, ``moments float64[n, 8]`` into one row per
    group. ``group`` (``int[n]``, values in ``0 .. ngroups-1``; default all rows in group 0)
    names each row's group; returns ``(int64[ngroups, w], float64[ngroups, 8])``, the rows of
    a group merged in their order (a group with no rows gets the empty state). Counts, min and
    max are exact whatever the order; the sums are compensated (module docstring).

    Rows as a trace stores them (a histogram is mostly zeros): ``counts`` holds only the
    header columns and ``hist = (start, stop, bucket, count)`` the histograms' non-zero
    buckets, row ``i``'s being histogram buckets ``bucket[start[i]:stop[i]]`` holding
    ``count[start[i]:stop[i]]``; ``width`` is the full counts-row width of the result. No dense
    ``[n, width]`` matrix is built."""
    counts = np.asarray(counts, dtype=np.int64)
    moments = np.asarray(moments, dtype=np.float64)
    if counts.ndim != 2 or moments.ndim != 2 or moments.shape != (counts.shape[0], NUM_MOMENTS):
        raise ValueError(
            f"merge_rows: expected counts [n, width] and moments [n, {NUM_MOMENTS}], got "
            f"{counts.shape} and {moments.shape}"
        )
    n, cols = counts.shape
    if hist is not None and (width is None or width < cols):
        raise ValueError(f"merge_rows: hist needs the row width (>= {cols}), got {width}")
    g = np.zeros(n, np.int64) if group is None else np.asarray(group, dtype=np.int64)
    if g.shape != (n,):
        raise ValueError(f"merge_rows: group has shape {g.shape}, expected ({n},)")
    ng = (int(g.max()) + 1 if n else 1) if ngroups is None else int(ngroups)
    if n and (g.min() < 0 or g.max() >= ng):
        raise ValueError(f"merge_rows: group ids must be in 0..{ng - 1}")
    out_c = np.zeros((ng, cols if hist is None else int(width)), np.int64)  # type: ignore[arg-type]
    if n:
        order = np.argsort(g, kind="stable")
        sorted_g = g[order]
        starts = _group_starts(sorted_g)
        rows = counts if np.array_equal(order, np.arange(n)) else counts[order]
        out_c[sorted_g[starts], :cols] = np.add.reduceat(rows, starts, axis=0)
    if hist is not None:
        start, stop, bucket, count = (np.asarray(a) for a in hist)
        if not start.shape == stop.shape == (n,):
            raise ValueError(f"merge_rows: hist has {start.shape}/{stop.shape} for {n} rows")
        lengths = np.maximum(stop - start, 0).astype(np.int64)
        total = int(lengths.sum())
        if total:
            row = np.repeat(np.arange(n), lengths)
            ends = np.cumsum(lengths)
            pos = np.arange(total) + np.repeat(start.astype(np.int64) - (ends - lengths), lengths)
            # one exact int64 scatter-add: rows of a group (and a bucket listed twice) add up;
            # a flat index is ~4x faster in np.add.at than a (row, column) pair
            b = bucket[pos].astype(np.int64)
            if b.min() < 0 or b.max() >= out_c.shape[1] - cols:
                raise ValueError(
                    f"merge_rows: a bucket index is outside 0..{out_c.shape[1] - cols - 1}"
                )
            flat = g[row] * out_c.shape[1] + cols + b
            np.add.at(out_c.reshape(-1), flat, count[pos].astype(np.int64))
    return out_c, merge_moments(moments, g, ng)


def merge_moments(moments: np.ndarray, group: np.ndarray, ngroups: int) -> np.ndarray:
    """The moments part of ``merge_rows``: ``float64[n, 8]`` rows into ``[ngroups, 8]``, the
    rows of a group in their order (what a cross-rank merge calls on the gathered moments of
    every rank, whose counts it adds by an all-reduce)."""
    moments = np.asarray(moments, dtype=np.float64)
    g = np.asarray(group, dtype=np.int64)
    out = empty_moments(ngroups)
    if g.size == 0:
        return out
    order = np.argsort(g, kind="stable")
    gs = g[order]
    starts = _group_starts(gs)
    present = gs[starts]
    m = moments[order]
    out[present, MIN] = np.minimum.reduceat(m[:, MIN], starts)
    out[present, MAX] = np.maximum.reduceat(m[:, MAX], starts)
    hi, lo, at = _pairwise(m[:, _HI], m[:, _LO], gs)
    out[at[:, None], _HI[None, :]] = hi
    out[at[:, None], _LO[None, :]] = lo
    return out


# ---- header statistics: one definition for every reader -----------------------------------
def finite_count(count: A, nan: A, posinf: A, neginf: A) -> A:
    """Finite values of a row: ``count - nan - posinf - neginf``."""
    return count - nan - posinf - neginf  # type: ignore[operator, no-any-return]


def finite_of_counts(counts: np.ndarray) -> np.ndarray:
    """``finite_count`` of counts rows (``[..., width]``)."""
    c = np.asarray(counts)
    return finite_count(c[..., COUNT], c[..., NAN], c[..., POSINF], c[..., NEGINF])


def _num(x: Any) -> Any:
    """Python numbers as numpy float64 (so a division by zero gives NaN/inf, not an error)."""
    return np.float64(x) if isinstance(x, int | float) else x


def _where_some(n: Any, value: Any) -> Any:
    """``value`` where ``n > 0``, NaN elsewhere (numpy arrays, scalars, pandas, xarray)."""
    if hasattr(value, "where"):
        return value.where(n > 0)
    return np.where(np.asarray(n) > 0, value, np.nan)


def mean(total: Any, n: Any) -> Any:
    """Mean of ``n`` finite values summing to ``total``; NaN where ``n == 0``."""
    n = _num(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _where_some(n, total / n)


def variance(total: Any, total_sq: Any, n: Any, comp: Any = 0.0, comp_sq: Any = 0.0) -> Any:
    """Population variance ``sumsq/n - mean^2`` of ``n`` finite values, clipped at 0; the
    compensation terms of the sums (if known) are folded in before the subtraction. NaN where
    ``n == 0`` or a sum overflowed."""
    n = _num(n)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        hi = total_sq / n - (total / n) ** 2
        lo = comp_sq / n - 2 * total * comp / (n * n)
        v = np.maximum(hi + lo, 0.0)
        ok = np.isfinite(total) & np.isfinite(total_sq) & (n > 0)
    if hasattr(v, "where"):
        return v.where(ok)
    return np.where(ok, v, np.nan)


def std(total: Any, total_sq: Any, n: Any) -> Any:
    """Population standard deviation (``sqrt(variance)``)."""
    return np.sqrt(variance(total, total_sq, n))


def rms(total_sq: Any, n: Any) -> Any:
    """Root mean square ``sqrt(sumsq / n)``; NaN where ``n == 0``."""
    n = _num(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _where_some(n, np.sqrt(total_sq / n))


def l2(total_sq: Any) -> Any:
    """L2 norm ``sqrt(sumsq)``."""
    return np.sqrt(total_sq)


__all__ = [
    "SUM_PAIRS",
    "empty_moments",
    "finite_count",
    "finite_of_counts",
    "l2",
    "mean",
    "merge_moments",
    "merge_rows",
    "rms",
    "std",
    "two_sum",
    "variance",
]
