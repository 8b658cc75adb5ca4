"""``summarize(x)``: the full statistics of a tensor in one read of its data."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..sketch.layout import DEFAULT_EMIN, DEFAULT_OCTAVES, Layout
from ..sketch.summary import Summary


def summarize(
    x: Tensor, k: int = 6, *, emin: int = DEFAULT_EMIN, octaves: int = DEFAULT_OCTAVES
) -> Summary:
    """Counts (NaN, ±Inf, zeros, negatives), finite min/max, compensated sum and sum of squares,
    and the log-linear histogram (``k`` mantissa bits: quantiles within a relative 2**-(k+1)) of
    a floating tensor, in one pass on its device. Returns a numpy ``Summary`` (this syncs)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"summarize expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"summarize expects a floating tensor, got {x.dtype}")
    layout = Layout(k, emin, octaves)
    with torch.no_grad():
        counts, moments = ops.tensor_summary(x.detach(), layout.k, layout.emin, layout.octaves)
    return Summary(counts.cpu().numpy(), moments.cpu().numpy(), layout)
