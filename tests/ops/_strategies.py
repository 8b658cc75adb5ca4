"""Hypothesis strategies for the summary ops: tensors drawn as bit patterns (so NaN payloads,
negative NaN, subnormals, ±0 and the exact edges of the histogram window all occur), in every
floating dtype, shaped with 0 and 1 sides and viewed non-contiguously."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# (emin, octaves) windows: the default, the widest, narrow ones that push most values into
# underflow/overflow, one ending at the top exponent 2**127, one octave wide.
WINDOWS = ((-48, 64), (-126, 254), (-2, 4), (-10, 20), (100, 28), (-126, 1), (0, 1), (-24, 40))

_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
_UINT = {16: np.uint16, 32: np.uint32, 64: np.uint64}
_SINT = {16: torch.int16, 32: torch.int32, 64: torch.int64}
_NP_SIGNED = {16: np.int16, 32: np.int32, 64: np.int64}

# float64 values are capped at 2**400 in magnitude so sums of squares stay finite (overflow of
# the sums has its own test): biased exponents above this are folded down.
_F64_MAX_EXP = 1023 + 400


def _cap_f64(b: int) -> int:
    e = (b >> 52) & 0x7FF
    if _F64_MAX_EXP < e < 0x7FF:
        b = (b & ~(0x7FF << 52)) | ((e % _F64_MAX_EXP) << 52)
    return b


def _bits_of(dtype: torch.dtype, v: float) -> int:
    """Bit pattern of ``v`` rounded to ``dtype`` (round to nearest even, as torch does)."""
    t = torch.tensor([v], dtype=torch.float64).to(dtype)
    w = _BITS[dtype]
    return int(t.view(_SINT[w]).item()) & ((1 << w) - 1)


# mantissa bits and significand precision of each dtype
_MBITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def _special_bits(dtype: torch.dtype) -> list[int]:
    """±0, ±1, ±Inf, quiet and signalling NaN of both signs, smallest and largest subnormal,
    smallest normal, largest finite, as bit patterns."""
    w, mb = _BITS[dtype], _MBITS[dtype]
    exp_all = ((1 << (w - 1 - mb)) - 1) << mb  # exponent field all ones
    one = _bits_of(dtype, 1.0)
    pos = [
        0,
        one,
        one | 1,
        exp_all,
        exp_all | (1 << (mb - 1)),
        exp_all | 1,
        1,
        (1 << mb) - 1,
        1 << mb,
        exp_all - 1,
    ]
    out = pos + [b | (1 << (w - 1)) for b in pos]
    return [_cap_f64(b) if dtype is torch.float64 else b for b in out]


def _window_edge_bits(dtype: torch.dtype, emin: int, octaves: int) -> list[int]:
    """±2**emin, ±2**(emin+octaves) and the values of ``dtype`` just below them (where they
    are representable; otherwise whatever they round to)."""
    w, p = _BITS[dtype], _MBITS[dtype] + 1
    out = []
    for e in (emin, emin + octaves):
        for v in (2.0**e, 2.0**e * (1 - 2.0**-p)):
            b = _bits_of(dtype, v)
            out += [b, b | (1 << (w - 1))]
    return out


@st.composite
def bit_arrays(
    draw, dtype: torch.dtype, shape: tuple[int, ...], emin: int = -48, octaves: int = 64
) -> torch.Tensor:
    """A contiguous tensor of ``dtype`` and ``shape`` from drawn bit patterns."""
    w = _BITS[dtype]
    specials = _special_bits(dtype) + _window_edge_bits(dtype, emin, octaves)
    typical = st.floats(-1e4, 1e4, allow_nan=False, width=64).map(lambda v: _bits_of(dtype, v))
    tiny = st.floats(-1e-6, 1e-6, allow_nan=False, width=64).map(lambda v: _bits_of(dtype, v))
    anything = st.integers(0, (1 << w) - 1)
    if dtype is torch.float64:
        anything = anything.map(_cap_f64)
    elem = st.one_of(st.sampled_from(specials), typical, tiny, anything)
    n = int(np.prod(shape)) if shape else 1
    bits = draw(st.lists(elem, min_size=n, max_size=n))
    arr = np.array(bits, dtype=_UINT[w]).reshape(shape)
    # reinterpret unsigned bits as the signed torch integer type, then as the float dtype
    return torch.from_numpy(arr.view(_NP_SIGNED[w]).copy()).view(dtype)


VIEWS = (
    "contiguous",
    "transpose",
    "step",
    "channels_last",
    "permute",
    "expand",
    "flat_step",
    "narrow",
)


def apply_view(base: torch.Tensor, view: str) -> torch.Tensor:
    """A (usually non-contiguous) view of ``base``; falls back to ``base`` where not possible."""
    if view == "transpose" and base.dim() >= 2:
        return base.transpose(0, -1)
    if view == "step" and base.dim() >= 1:
        return base[..., ::2]
    if view == "channels_last" and base.dim() == 4:
        return base.contiguous(memory_format=torch.channels_last)
    if view == "permute" and base.dim() >= 3:
        return base.permute(2, 0, 1, *range(3, base.dim()))
    if view == "expand" and base.dim() >= 1 and base.shape[0] == 1:
        return base.expand(3, *base.shape[1:])  # overlapping: every element counted 3 times
    if view == "flat_step":
        return base.reshape(-1)[1::3]
    if view == "narrow" and base.dim() >= 1 and base.shape[-1] >= 2:
        return base.narrow(-1, 1, base.shape[-1] - 1)
    return base


@st.composite
def tensors(
    draw, dtypes=DTYPES, emin: int = -48, octaves: int = 64, max_side: int = 24, max_dims: int = 4
) -> torch.Tensor:
    dtype = draw(st.sampled_from(dtypes))
    # tiny shapes with 0 and 1 sides, longer vectors and matrices, 4-d tensors (channels_last)
    shape = draw(
        st.one_of(
            array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=3),
            array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=8 * max_side),
            array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=max_side // 3),
        )
    )
    if int(np.prod(shape)) > 4096:  # keep examples small: the long paths have their own tests
        shape = shape[:1]
    base = draw(bit_arrays(dtype, tuple(shape), emin, octaves))
    return apply_view(base, draw(st.sampled_from(VIEWS)))


@st.composite
def layouts(draw) -> tuple[int, int, int]:
    k = draw(st.integers(0, 7))
    emin, octaves = draw(st.sampled_from(WINDOWS))
    return k, emin, octaves


def exact_f64(x: torch.Tensor) -> np.ndarray:
    """The exact float64 values of ``x`` (every floating dtype converts exactly)."""
    return x.detach().cpu().to(torch.float64).numpy()


__all__ = [
    "DTYPES",
    "VIEWS",
    "WINDOWS",
    "apply_view",
    "bit_arrays",
    "exact_f64",
    "layouts",
    "tensors",
]
