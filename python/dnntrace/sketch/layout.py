"""The log-linear bucket layout, mirrored from ``csrc/core/loglinear.h`` in numpy (no torch).

A finite non-zero value ``v`` with ``|v| = 2**e * (1 + f)`` falls in bucket
``(e - emin) * 2**k + floor(f * 2**k)`` of its sign. For float32 this is the float's bits shifted
right by ``23 - k``. Bucket representatives (harmonic mean of the bounds) are within a relative
``2**-(k + 1)`` of every value in the bucket: with relative accuracy 0.78 % (k = 6), if the true
value is 100 the representative lies in [99.22, 100.78].
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

# Header of a slot's counts row; must equal the C++ enum CountField (tested).
COUNT = 0
NAN = 1
POSINF = 2
NEGINF = 3
ZEROS = 4
NEGATIVES = 5
UNDER_POS = 6
UNDER_NEG = 7
OVER_POS = 8
OVER_NEG = 9
CALLS = 10
HEADER = 16

# Moments row; must equal the C++ enum MomentField.
SUM = 0
SUM_COMP = 1
SUMSQ = 2
SUMSQ_COMP = 3
MIN = 4
MAX = 5
NUM_MOMENTS = 8

DEFAULT_K = 6
DEFAULT_EMIN = -48
DEFAULT_OCTAVES = 64
MAX_K = 7


@dataclass(frozen=True)
class Layout:
    """Parameters of the log-linear histogram: ``k`` mantissa bits, exponent window
    ``[2**emin, 2**(emin + octaves))``."""

    k: int = DEFAULT_K
    emin: int = DEFAULT_EMIN
    octaves: int = DEFAULT_OCTAVES

    def __post_init__(self) -> None:
        for name in ("k", "emin", "octaves"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if not 0 <= self.k <= MAX_K:
            raise ValueError(f"k must be in 0..{MAX_K}, got {self.k}")
        if not 1 <= self.octaves <= 254:
            raise ValueError(f"octaves must be in 1..254, got {self.octaves}")
        if self.emin < -126:
            raise ValueError(f"emin must be >= -126, got {self.emin}")
        if self.emin + self.octaves > 128:
            raise ValueError(f"emin + octaves must be <= 128, got {self.emin} + {self.octaves}")

    @property
    def per_sign(self) -> int:
        return self.octaves << self.k

    @property
    def bins(self) -> int:
        return 2 * self.per_sign

    @property
    def width(self) -> int:
        """Length of a slot's counts row (header + histogram)."""
        return HEADER + self.bins

    @property
    def relative_accuracy(self) -> float:
        """Bound on the relative error of a bucket representative: 2**-(k+1)."""
        return 2.0 ** -(self.k + 1)

    def abs_lower(self, j: np.ndarray) -> np.ndarray:
        """Lower bound of |value| for within-sign bucket ``j`` (0 <= j <= per_sign)."""
        j = np.asarray(j, dtype=np.int64)
        e = self.emin + (j >> self.k)
        m = j & ((1 << self.k) - 1)
        return np.ldexp(1.0 + m / float(1 << self.k), e.astype(np.int32))

    def edges(self) -> np.ndarray:
        """The ``bins + 2`` ascending bucket edges: ``per_sign + 1`` negative edges ending at
        ``-2**emin``, then ``per_sign + 1`` positive ones from ``2**emin`` (the gap between them
        is where zeros and underflow live)."""
        p = self.per_sign
        pos = self.abs_lower(np.arange(p + 1))
        neg = -pos[::-1]
        # neg ends at -2**emin, pos starts at +2**emin: bins are [neg..., -2**emin] [2**emin, ...]
        return np.concatenate([neg, pos])

    def bucket_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) of every bucket in row order, lo < hi, signed values."""
        p = self.per_sign
        a_lo = self.abs_lower(np.arange(p))
        a_hi = self.abs_lower(np.arange(1, p + 1))
        lo = np.concatenate([-a_hi[::-1], a_lo])
        hi = np.concatenate([-a_lo[::-1], a_hi])
        return lo, hi

    def representatives(self) -> np.ndarray:
        """Harmonic mean of each bucket's bounds (signed), in row order."""
        p = self.per_sign
        a_lo = self.abs_lower(np.arange(p))
        a_hi = self.abs_lower(np.arange(1, p + 1))
        rep = 2.0 * a_lo * a_hi / (a_lo + a_hi)
        return np.concatenate([-rep[::-1], rep])

    def to_dict(self) -> dict[str, int]:
        return {"k": self.k, "emin": self.emin, "octaves": self.octaves}


def row_index(x: np.ndarray, layout: Layout) -> np.ndarray:
    """Index into a slot's counts row for each value (the numpy twin of ``row_index`` in C++).

    float16/bfloat16-like inputs should be passed as their exact float32 values; float64 values
    are mapped from their own bits.
    """
    x = np.asarray(x)
    if x.dtype == np.float64:
        bits = x.view(np.uint64)
        a = bits & np.uint64(0x7FFFFFFFFFFFFFFF)
        s = (bits >> np.uint64(63)).astype(np.int64)
        j = (a >> np.uint64(52 - layout.k)).astype(np.int64) - ((layout.emin + 1023) << layout.k)
        is_nan = a > np.uint64(0x7FF0000000000000)
        is_inf = a == np.uint64(0x7FF0000000000000)
    else:
        x32 = x.astype(np.float32)
        bits = x32.view(np.uint32)
        a = bits & np.uint32(0x7FFFFFFF)
        s = (bits >> np.uint32(31)).astype(np.int64)
        j = (a >> np.uint32(23 - layout.k)).astype(np.int64) - ((layout.emin + 127) << layout.k)
        is_nan = a > np.uint32(0x7F800000)
        is_inf = a == np.uint32(0x7F800000)
    p = layout.per_sign
    hist = HEADER + p + np.where(s == 1, -1 - j, j)
    out = np.where(j < 0, UNDER_POS + s, OVER_POS + s)
    out = np.where((j >= 0) & (j < p), hist, out)
    out = np.where(a == 0, ZEROS, out)
    out = np.where(is_inf, POSINF + s, out)
    out = np.where(is_nan, NAN, out)
    return out.astype(np.int64)
