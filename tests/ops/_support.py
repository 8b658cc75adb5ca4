"""State allocation and the comparison of a state row with ``tensor_summary_ref``."""

from __future__ import annotations

import math

import numpy as np
import torch

from reference import (
    CALLS,
    COUNT,
    HEADER,
    MAX,
    MIN,
    NAN,
    NEGATIVES,
    NEGINF,
    POSINF,
    SUM,
    SUM_COMP,
    SUMSQ,
    SUMSQ_COMP,
    ZEROS,
    abs_sum_ref,
    width_ref,
)

HEADER_NAMES = (
    "count",
    "nan",
    "posinf",
    "neginf",
    "zeros",
    "negatives",
    "under_pos",
    "under_neg",
    "over_pos",
    "over_neg",
    "calls",
)

# Moments-only mode (histogram=False) still fills these header fields.
MOMENTS_ONLY_FIELDS = (COUNT, NAN, POSINF, NEGINF, ZEROS, NEGATIVES, CALLS)


def fresh_state(
    slots: int, k: int, emin: int, octaves: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed state as the op expects it: min at +inf, max at -inf."""
    counts = torch.zeros((slots, width_ref(k, octaves)), dtype=torch.int64, device=device)
    moments = torch.zeros((slots, 8), dtype=torch.float64, device=device)
    moments[:, MIN] = math.inf
    moments[:, MAX] = -math.inf
    return counts, moments


def describe_count_diff(got: np.ndarray, want: np.ndarray) -> str:
    """A readable list of the count fields and buckets that differ."""
    bad = np.flatnonzero(got != want)
    parts = []
    for i in bad[:12]:
        name = HEADER_NAMES[i] if i < len(HEADER_NAMES) else f"bucket {i - HEADER}"
        parts.append(f"{name}: got {got[i]} want {want[i]}")
    more = f" (+{bad.size - 12} more)" if bad.size > 12 else ""
    return "; ".join(parts) + more


def assert_counts_equal(got: np.ndarray, want: np.ndarray, *, histogram: bool = True) -> None:
    got = np.asarray(got)
    want = np.asarray(want)
    if not histogram:
        want = np.where(np.isin(np.arange(want.size), MOMENTS_ONLY_FIELDS), want, 0)
    assert got.shape == want.shape, f"counts row of {got.shape}, expected {want.shape}"
    assert np.array_equal(got, want), describe_count_diff(got, want)


def assert_moments_close(
    got: np.ndarray, want: np.ndarray, values: np.ndarray, rtol: float = 1e-12
) -> None:
    """min/max exact; sum within ``rtol * sum|x|``; sum of squares within ``rtol`` of itself;
    the unused tail of the row untouched (0)."""
    got = np.asarray(got, dtype=np.float64)
    assert got[MIN] == want[MIN], f"min: got {got[MIN]!r} want {want[MIN]!r}"
    assert got[MAX] == want[MAX], f"max: got {got[MAX]!r} want {want[MAX]!r}"
    s = got[SUM] + got[SUM_COMP]
    ss = got[SUMSQ] + got[SUMSQ_COMP]
    scale = abs_sum_ref(values)
    assert abs(s - want[SUM]) <= rtol * scale, (
        f"sum: got {s!r} want {want[SUM]!r} (sum|x| = {scale!r})"
    )
    assert abs(ss - want[SUMSQ]) <= rtol * want[SUMSQ], f"sumsq: got {ss!r} want {want[SUMSQ]!r}"
    assert np.all(got[6:] == 0), f"moments[6:] should stay 0, got {got[6:]}"
