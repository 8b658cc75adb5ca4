"""Slow, obvious float64 references for the statistics core, written from docs/FORMAT.md.

Nothing here imports dnntrace: the bucket of a value is found from its exponent and mantissa with
``np.frexp`` (exact for every float64), not by shifting its bits as ``csrc/core/loglinear.h`` and
``dnntrace.storage.layout.row_index`` do, so the two definitions check each other.

Rounding conventions, pinned:
- every input dtype (float16, bfloat16, float32, float64) is taken at its exact float64 value;
  no value is rounded before it is bucketed (a float64 lands in the bucket of its own value);
- the bucket of a finite non-zero ``v`` with ``|v| = 2**e * (1 + f)``, ``0 <= f < 1``, is
  ``j = (e - emin) * 2**k + floor(f * 2**k)``: the mantissa is truncated (towards zero), never
  rounded, so a bucket is ``[lower(j), upper(j))`` in magnitude, lower bound included;
- ``|v| < 2**emin`` is underflow (subnormals included), ``|v| >= 2**(emin + octaves)`` overflow;
- sums are ``math.fsum`` (correctly rounded) of the finite values, and of their squares each
  rounded once to float64 (exact for float32 and narrower inputs, whose squares fit a double).
"""

from __future__ import annotations

import math

import numpy as np

# Header of a counts row, from docs/FORMAT.md and loglinear.h's comments (restated, not imported).
COUNT, NAN, POSINF, NEGINF, ZEROS, NEGATIVES = 0, 1, 2, 3, 4, 5
UNDER_POS, UNDER_NEG, OVER_POS, OVER_NEG, CALLS = 6, 7, 8, 9, 10
HEADER = 16
SUM, SUM_COMP, SUMSQ, SUMSQ_COMP, MIN, MAX = 0, 1, 2, 3, 4, 5
NUM_MOMENTS = 8


def width_ref(k: int, octaves: int) -> int:
    return HEADER + 2 * octaves * 2**k


def row_index_ref(values: np.ndarray, k: int, emin: int, octaves: int) -> np.ndarray:
    """Index into a counts row of each value (float64 array of exact values)."""
    with np.errstate(invalid="ignore"):  # casting a signalling NaN quiets it: still NaN
        v = np.asarray(values).astype(np.float64).reshape(-1)
    per_sign = octaves * 2**k
    out = np.empty(v.shape, dtype=np.int64)
    neg = np.signbit(v)
    mag = np.abs(v)
    # frexp: mag = m * 2**ex with 0.5 <= m < 1, so mag = 2**(ex - 1) * (1 + f) with f = 2m - 1.
    m, ex = np.frexp(np.where(np.isfinite(mag), mag, 1.0))
    e = ex.astype(np.int64) - 1
    f = 2.0 * m - 1.0
    # f * 2**k scales by a power of two: exact, so floor() truncates the true mantissa.
    j = (e - emin) * 2**k + np.floor(np.ldexp(f, k)).astype(np.int64)
    hist_pos = HEADER + per_sign + j
    hist_neg = HEADER + per_sign - 1 - j  # negative half stored most negative first
    out[:] = np.where(neg, hist_neg, hist_pos)
    out[e < emin] = np.where(neg, UNDER_NEG, UNDER_POS)[e < emin]
    over = e >= emin + octaves
    out[over] = np.where(neg, OVER_NEG, OVER_POS)[over]
    out[mag == 0] = ZEROS
    out[np.isinf(v) & ~neg] = POSINF
    out[np.isinf(v) & neg] = NEGINF
    out[np.isnan(v)] = NAN
    return out


def tensor_summary_ref(
    x: np.ndarray, k: int = 6, emin: int = -48, octaves: int = 64, *, calls: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(counts int64[width], moments float64[8]) of the values of ``x`` (any float array; pass
    float16/bfloat16 data as its exact float32 or float64 values)."""
    with np.errstate(invalid="ignore"):
        v = np.asarray(x).astype(np.float64).reshape(-1)
    counts = np.zeros(width_ref(k, octaves), dtype=np.int64)
    idx = row_index_ref(v, k, emin, octaves)
    np.add.at(counts, idx, 1)  # the special counters (NaN, ±Inf, zeros, ...) are bucket ids too
    counts[COUNT] = v.size
    counts[NEGATIVES] = int(np.count_nonzero(v < 0))  # -0 is not < 0, NaN compares false
    counts[CALLS] = calls
    fin = v[np.isfinite(v)]
    moments = np.zeros(NUM_MOMENTS, dtype=np.float64)
    moments[SUM] = math.fsum(fin.tolist())
    moments[SUMSQ] = math.fsum((fin * fin).tolist())
    moments[MIN] = fin.min() if fin.size else math.inf
    moments[MAX] = fin.max() if fin.size else -math.inf
    return counts, moments


def abs_sum_ref(x: np.ndarray) -> float:
    """sum |x| over the finite values: the scale a sum's error is measured against."""
    v = np.asarray(x).astype(np.float64).reshape(-1)
    return math.fsum(np.abs(v[np.isfinite(v)]).tolist())


def summary_fields_ref(x: np.ndarray) -> dict[str, float | int]:
    """The public fields of ``dnntrace.summarize`` from numpy/float64 (population variance)."""
    v = np.asarray(x).astype(np.float64).reshape(-1)
    fin = v[np.isfinite(v)]
    n = fin.size
    out: dict[str, float | int] = {
        "count": v.size,
        "nan": int(np.isnan(v).sum()),
        "posinf": int((v == np.inf).sum()),
        "neginf": int((v == -np.inf).sum()),
        "zeros": int((v == 0).sum()),
        "negatives": int((v < 0).sum()),
    }
    if n == 0:
        out.update(
            min=math.nan,
            max=math.nan,
            mean=math.nan,
            var=math.nan,
            std=math.nan,
            absmax=math.nan,
            l2=0.0,
        )
        return out
    mean = math.fsum(fin.tolist()) / n
    var = math.fsum(((fin - mean) ** 2).tolist()) / n
    out.update(
        min=float(fin.min()),
        max=float(fin.max()),
        mean=mean,
        var=var,
        std=math.sqrt(var),
        absmax=float(np.abs(fin).max()),
        l2=math.sqrt(math.fsum((fin * fin).tolist())),
    )
    return out


def quantile_ref(x: np.ndarray, q: np.ndarray | float) -> np.ndarray:
    """Inverted-CDF quantile of the non-NaN values (the definition ``Summary.quantile`` uses)."""
    v = np.asarray(x).astype(np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    return np.quantile(v, q, method="inverted_cdf")
