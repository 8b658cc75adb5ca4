"""Typed wrappers over ``torch.ops.dnntrace.*`` and their fake (meta) kernels.

The only module that calls ``torch.ops.dnntrace.*`` operators. Loading ``dnntrace._C`` registers
the ops; the package's ``__init__`` adds the Python entry points ``torch.ops.dnntrace.enable`` /
``disable`` (no module of dnntrace is imported here but ``_C`` and the sketch layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.dnntrace.*)
from .sketch.layout import DEFAULT_EMIN, DEFAULT_K, DEFAULT_OCTAVES, NUM_MOMENTS, Layout

WITH_CUDA: bool = bool(_C.WITH_CUDA)


def tensor_summary_out(
    x: Tensor,
    slot: int,
    counts: Tensor,
    moments: Tensor,
    layout: Layout,
    *,
    histogram: bool = True,
) -> None:
    """Adds the statistics of ``x`` into row ``slot`` of (``counts``, ``moments``). No sync."""
    torch.ops.dnntrace.tensor_summary_out.default(
        x, slot, layout.k, layout.emin, layout.octaves, histogram, counts, moments
    )


def multi_tensor_summary_out(
    xs: Sequence[Tensor],
    slots: Sequence[int],
    counts: Tensor,
    moments: Tensor,
    layout: Layout,
    *,
    histogram: bool = True,
) -> None:
    """``tensor_summary_out`` for many tensors, each into its own slot, in few launches."""
    torch.ops.dnntrace.multi_tensor_summary_out.default(
        list(xs), list(slots), layout.k, layout.emin, layout.octaves, histogram, counts, moments
    )


def tensor_summary(
    x: Tensor, k: int = DEFAULT_K, emin: int = DEFAULT_EMIN, octaves: int = DEFAULT_OCTAVES
) -> tuple[Tensor, Tensor]:
    """Fresh (counts int64[width], moments float64[8]) of ``x`` on its device."""
    counts, moments = torch.ops.dnntrace.tensor_summary.default(x, k, emin, octaves)
    return counts, moments


@torch.library.register_fake("dnntrace::tensor_summary_out")
def _tensor_summary_out_fake(x, slot, k, emin, octaves, histogram, counts, moments):  # type: ignore[no-untyped-def]
    return None


@torch.library.register_fake("dnntrace::multi_tensor_summary_out")
def _multi_fake(xs, slots, k, emin, octaves, histogram, counts, moments):  # type: ignore[no-untyped-def]
    return None


@torch.library.register_fake("dnntrace::tensor_summary")
def _tensor_summary_fake(x, k=DEFAULT_K, emin=DEFAULT_EMIN, octaves=DEFAULT_OCTAVES):  # type: ignore[no-untyped-def]
    width = Layout(k, emin, octaves).width
    return (
        x.new_empty((width,), dtype=torch.int64),
        x.new_empty((NUM_MOMENTS,), dtype=torch.float64),
    )
