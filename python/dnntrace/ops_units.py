"""Typed wrappers over the per-unit ops ``torch.ops.dnntrace.unit_*`` and their fake kernels.

Native kernels exist for the CPU; other devices use ``dnntrace.stats.units``' torch fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.dnntrace.*)

ACT_COLUMNS = ("count", "sum", "sumsq", "firing", "saturated", "max")
GRAD_COLUMNS = ("rows", "count", "grad_sumsq", "attr", "attr_abs")


def unit_summary_out(x: Tensor, dim: int, lo: float, hi: float, acc: Tensor) -> None:
    """Adds per-unit statistics of ``x`` (units on ``dim``) into ``acc`` float64[units, 6]
    (columns ``ACT_COLUMNS``; ``max`` is folded). Saturated: ``x <= lo or x >= hi``; a NaN bound
    never matches. No sync."""
    torch.ops.dnntrace.unit_summary_out.default(x, dim, lo, hi, acc)


def unit_grad_summary_out(g: Tensor, x: Tensor | None, dim: int, acc: Tensor) -> None:
    """Adds per-unit gradient statistics of ``g`` (and ``x * g`` when ``x`` is given) into
    ``acc`` float64[units, 5] (columns ``GRAD_COLUMNS``). No sync."""
    torch.ops.dnntrace.unit_grad_summary_out.default(g, x, dim, acc)


@torch.library.register_fake("dnntrace::unit_summary_out")
def _unit_summary_out_fake(x, dim, lo, hi, acc):  # type: ignore[no-untyped-def]
    return None


@torch.library.register_fake("dnntrace::unit_grad_summary_out")
def _unit_grad_summary_out_fake(g, x, dim, acc):  # type: ignore[no-untyped-def]
    return None
