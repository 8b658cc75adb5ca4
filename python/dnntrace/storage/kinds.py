"""The registry of row kinds: which rows are the model's tensors and which are derived.

One place that says what a ``kind`` is, read by ``dnntrace info``, the reader's anomalies and every
viewer tab, so that a flag means the same everywhere:

- **tensor kinds** (``activation``, ``activation_grad``, ``weight``, ``weight_grad``): a summary of
  one of the model's tensors (counts, moments, log-linear histogram). Only these raise the
  model's flags: a NaN/Inf in one of them is a NaN/Inf in the model.
- ``scalar``: a logged number (loss, learning rate, noise scale, ...), one row per name and step.
- **derived kinds**: vector rows computed from the model's tensors (per-unit statistics,
  spectra and their power-law fits, training dynamics, the distributed-run diagnostics, the
  anomaly tracer's own rows). A NaN in them is a property of the estimate (e.g. a power law
  that cannot be fitted gives ``alpha = NaN``), never a NaN in the model.

Imports nothing but pyarrow (``storage`` stays torch-free).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

TENSOR_KINDS = ("activation", "activation_grad", "weight", "weight_grad")
SCALAR_KIND = "scalar"

# per-unit vector rows (capture/units.py): one value per unit of a module
UNIT_KINDS = (
    "unit_mean",
    "unit_sq_mean",
    "unit_firing",
    "unit_saturated",
    "unit_max",
    "unit_grad_rms",
    "unit_attr",
    "unit_attr_abs",
)
UNIT_TOPK_KINDS = ("unit_topk_value", "unit_topk_index", "unit_topk_step")
# the anomaly tracer's rows (capture/anomaly.py): the origin of a NaN and the execution order
ANOMALY_KINDS = ("anomaly", "exec_order")
# spectra and training dynamics (capture/spectral.py)
SPECTRAL_KINDS = (
    "sigma_max",
    "frobenius_norm",
    "stable_rank",
    "spectrum",
    "esd",
    "feature_eigs",
    "rankme",
    "update_ratio",
    "trajectory",
    "trajectory_pca",
    "filter_norm",
)
# distributed-run diagnostics (capture/distributed.py)
RANK_KINDS = ("grad_diversity", "gns_g2", "gns_trace_sigma", "gns_b_simple")

DERIVED_KINDS = UNIT_KINDS + UNIT_TOPK_KINDS + ANOMALY_KINDS + SPECTRAL_KINDS + RANK_KINDS

# the scalar names whose presence opens the viewer's spectral tab (capture/spectral.py)
SPECTRAL_SCALAR_PREFIXES = ("gns/", "hessian/")


def is_tensor_kind(kind: str) -> bool:
    """True for rows that summarise one of the model's tensors (the only rows that flag)."""
    return kind in TENSOR_KINDS


def family(kind: str) -> str:
    """``tensor``, ``scalar``, ``unit``, ``anomaly``, ``spectral``, ``rank`` or ``other`` (a
    kind this version does not know: a reader skips it, it never flags)."""
    if kind in TENSOR_KINDS:
        return "tensor"
    if kind == SCALAR_KIND:
        return "scalar"
    if kind in UNIT_KINDS or kind in UNIT_TOPK_KINDS or kind.startswith("unit_"):
        return "unit"
    if kind in ANOMALY_KINDS:
        return "anomaly"
    if kind in SPECTRAL_KINDS:
        return "spectral"
    if kind in RANK_KINDS:
        return "rank"
    return "other"


def tensor_rows(table: pa.Table) -> pa.Table:
    """The rows of ``table`` that summarise the model's tensors (``TENSOR_KINDS``)."""
    if table.num_rows == 0:
        return table
    col = table.column("kind")
    if pa.types.is_dictionary(col.type):
        col = col.cast(pa.string())
    return table.filter(pc.is_in(col, pa.array(list(TENSOR_KINDS))))


def nonfinite_mask(table: pa.Table) -> pa.ChunkedArray:
    """Per row: True where NaN or ±Inf elements were counted (``nan + posinf + neginf > 0``)."""
    bad = pc.add(
        pc.add(table.column("nan_count"), table.column("posinf_count")), table["neginf_count"]
    )
    return pc.fill_null(pc.greater(bad, 0), False)


def culprit(modules: Sequence[str], order: Mapping[str, int]) -> int:
    """Index into ``modules`` (module paths flagged at one step) of the one that produced the
    non-finite value: a module none of whose submodules is flagged (a parent's output holds its
    children's, so a parent only passed it on), the first of those in ``order`` (execution
    order, position per path). Used by ``Trace.anomalies``, ``RunSet.first_nonfinite`` and so
    by ``dnntrace info`` and the viewer."""

    def inner(m: str) -> bool:
        return not any(o != m and (m == "" or o.startswith(m + ".")) for o in modules)

    cand = [i for i, m in enumerate(modules) if inner(m)] or list(range(len(modules)))
    return min(cand, key=lambda i: order.get(modules[i], len(order)))


__all__ = [
    "ANOMALY_KINDS",
    "DERIVED_KINDS",
    "RANK_KINDS",
    "SCALAR_KIND",
    "SPECTRAL_KINDS",
    "SPECTRAL_SCALAR_PREFIXES",
    "TENSOR_KINDS",
    "UNIT_KINDS",
    "UNIT_TOPK_KINDS",
    "culprit",
    "family",
    "is_tensor_kind",
    "nonfinite_mask",
    "tensor_rows",
]
