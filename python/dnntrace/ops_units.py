"""Typed wrappers over the per-unit ops ``torch.ops.dnntrace.unit_*`` and their fake kernels.

Native kernels exist for the CPU and, in a CUDA build, for CUDA (one pass over the input each);
``native(device)`` says whether a device has them. Other devices use ``dnntrace.stats.units``'
torch fallback.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.dnntrace.*)

ACT_COLUMNS = ("count", "sum", "sumsq", "firing", "saturated", "max")
GRAD_COLUMNS = ("rows", "count", "grad_sumsq", "attr", "attr_abs")
MAX_TOPK = 64  # core::kMaxUnitTopK


@functools.cache
def native(device_type: str) -> bool:
    """True when the per-unit ops have a native kernel for ``device_type`` ("cpu", "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"dnntrace::{op}", key)
        for op in ("unit_summary_out", "unit_grad_summary_out", "unit_topk_update")
    )


def unit_summary_out(x: Tensor, dim: int, lo: float, hi: float, acc: Tensor) -> None:
    """Adds per-unit statistics of ``x`` (units on ``dim``) into ``acc`` float64[units, 6]
    (columns ``ACT_COLUMNS``; ``max`` is folded). Saturated: ``x <= lo or x >= hi``; a NaN bound
    never matches. No sync."""
    torch.ops.dnntrace.unit_summary_out.default(x, dim, lo, hi, acc)


def unit_grad_summary_out(g: Tensor, x: Tensor | None, dim: int, acc: Tensor) -> None:
    """Adds per-unit gradient statistics of ``g`` (and ``x * g`` when ``x`` is given) into
    ``acc`` float64[units, 5] (columns ``GRAD_COLUMNS``). No sync."""
    torch.ops.dnntrace.unit_grad_summary_out.default(g, x, dim, acc)


def unit_topk_update(
    samples: Tensor, ids: Tensor, step: int, values: Tensor, sample_ids: Tensor, steps: Tensor
) -> None:
    """Merges ``samples`` [batch, units] (ids [batch]) into each unit's descending top-k
    ``values`` / ``sample_ids`` / ``steps`` float32[units, k]: a value enters when strictly
    greater than the unit's k-th (equal values keep the earlier); NaN never enters. No sync."""
    torch.ops.dnntrace.unit_topk_update.default(samples, ids, step, values, sample_ids, steps)


@torch.library.register_fake("dnntrace::unit_summary_out")
def _unit_summary_out_fake(x, dim, lo, hi, acc):  # type: ignore[no-untyped-def]
    return None


@torch.library.register_fake("dnntrace::unit_grad_summary_out")
def _unit_grad_summary_out_fake(g, x, dim, acc):  # type: ignore[no-untyped-def]
    return None


@torch.library.register_fake("dnntrace::unit_topk_update")
def _unit_topk_update_fake(samples, ids, step, values, sample_ids, steps):  # type: ignore[no-untyped-def]
    return None
