"""The registry of row kinds: every ``kind`` a trace holds, what its row is, and who flags it.

One place that says what a ``kind`` is, read by the writers (capture), the reader, ``dnntrace
info`` and every viewer tab, so that a flag means the same everywhere. Each ``Kind`` says:

- ``family``: ``tensor`` (a summary of one of the model's tensors: counts, moments, log-linear
  histogram), ``scalar`` (a logged number), ``unit`` (per-unit statistics), ``anomaly``,
  ``spectral`` (spectra and training dynamics), ``rank`` (distributed-run diagnostics),
  ``landscape`` (the loss-landscape file);
- ``shape``: ``histogram`` (a tensor-summary row, ``values`` null), ``scalar`` (one number, in
  ``sum``), ``per_unit`` (``values`` has one entry per unit), ``per_matrix`` (``[units, k]``
  row-major), ``vector`` (a list whose length the kind documents), ``fields`` (named values:
  ``fields`` gives their order; write them with ``pack``, read them with ``unpack``);
- ``flags``: True only for the model's own tensors (``activation``, ``activation_grad``,
  ``weight``, ``weight_grad``): a NaN/Inf in one of them is a NaN/Inf in the model. Every other
  row is *derived* (an estimate, a copy, or a diagnostic): its NaN is a property of the estimate
  (e.g. a power law that cannot be fitted gives ``alpha = NaN``), never the model's;
- ``tab``: the viewer tab that opens when a trace holds the kind (``units``, ``spectral``), if any.

A kind this version does not know is family ``other``: a reader skips it, it never flags.
Imports nothing but pyarrow (``storage`` stays torch-free).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class Kind:
    """One row kind of the trace format (module docstring)."""

    name: str
    family: str
    shape: str
    doc: str
    flags: bool = False
    fields: tuple[str, ...] = ()
    tab: str | None = None


# ---- names: the only place each is spelt ---------------------------------------------------
ACTIVATION = "activation"
ACTIVATION_GRAD = "activation_grad"
WEIGHT = "weight"
WEIGHT_GRAD = "weight_grad"
WEIGHT_GRAD_LOCAL = "weight_grad_local"
INPUT = "input"
SCALAR = "scalar"
SCALAR_KIND = SCALAR  # the name before the registry

UNIT_MEAN = "unit_mean"
UNIT_SQ_MEAN = "unit_sq_mean"
UNIT_FIRING = "unit_firing"
UNIT_SATURATED = "unit_saturated"
UNIT_MAX = "unit_max"
UNIT_GRAD_RMS = "unit_grad_rms"
UNIT_ATTR = "unit_attr"
UNIT_ATTR_ABS = "unit_attr_abs"
UNIT_TOPK_VALUE = "unit_topk_value"
UNIT_TOPK_INDEX = "unit_topk_index"
UNIT_TOPK_STEP = "unit_topk_step"

ANOMALY = "anomaly"
EXEC_ORDER = "exec_order"

SIGMA_MAX = "sigma_max"
FROBENIUS_NORM = "frobenius_norm"
STABLE_RANK = "stable_rank"
SPECTRUM = "spectrum"
ESD = "esd"
FEATURE_EIGS = "feature_eigs"
RANKME = "rankme"
UPDATE_RATIO = "update_ratio"
TRAJECTORY = "trajectory"
TRAJECTORY_PCA = "trajectory_pca"
FILTER_NORM = "filter_norm"

LANDSCAPE = "landscape"
LANDSCAPE_AXIS = "landscape_axis"

GRAD_SQNORM_LOCAL = "grad_sqnorm_local"
GRAD_SQNORM_RANK_MEAN = "grad_sqnorm_rank_mean"
GRAD_SQNORM_AVG = "grad_sqnorm_avg"
GRAD_DIVERSITY = "grad_diversity"
GNS_G2 = "gns_g2"
GNS_TRACE_SIGMA = "gns_trace_sigma"
GNS_B_SIMPLE = "gns_b_simple"

# the ``tensor`` label of exec_order rows (which pass recorded the order)
EXEC_FIRST_CALL = "first_call"
EXEC_FORWARD = "forward"
EXEC_BACKWARD = "backward"

# ---- the registry ----------------------------------------------------------------------------
_T, _U, _S, _R = "tensor", "unit", "spectral", "rank"
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(ACTIVATION, _T, "histogram", "a module's output", flags=True),
        Kind(ACTIVATION_GRAD, _T, "histogram", "the gradient of a module's output", flags=True),
        Kind(WEIGHT, _T, "histogram", "a parameter", flags=True),
        Kind(WEIGHT_GRAD, _T, "histogram", "a parameter's gradient", flags=True),
        Kind(
            WEIGHT_GRAD_LOCAL,
            _R,
            "histogram",
            "a parameter's gradient on this rank before the DDP all-reduce (flagged through the "
            "reduced weight_grad it enters)",
        ),
        Kind(INPUT, "anomaly", "histogram", "a module's input (the anomaly tracer's rows)"),
        Kind(SCALAR, "scalar", "scalar", "a logged number: loss, learning rate, noise scale"),
        Kind(UNIT_MEAN, _U, "per_unit", "mean of each unit's outputs", tab="units"),
        Kind(UNIT_SQ_MEAN, _U, "per_unit", "mean of squares of each unit's outputs", tab="units"),
        Kind(UNIT_FIRING, _U, "per_unit", "fraction of outputs > 0", tab="units"),
        Kind(UNIT_SATURATED, _U, "per_unit", "fraction of saturated outputs", tab="units"),
        Kind(UNIT_MAX, _U, "per_unit", "max of each unit's outputs", tab="units"),
        Kind(UNIT_GRAD_RMS, _U, "per_unit", "RMS of each unit's output gradient", tab="units"),
        Kind(UNIT_ATTR, _U, "per_unit", "sum of x·g per row, averaged over rows", tab="units"),
        Kind(UNIT_ATTR_ABS, _U, "per_unit", "sum of |x·g| per row, averaged", tab="units"),
        Kind(UNIT_TOPK_VALUE, _U, "per_matrix", "top-k activations [units, k]", tab="units"),
        Kind(UNIT_TOPK_INDEX, _U, "per_matrix", "their sample ids [units, k]", tab="units"),
        Kind(UNIT_TOPK_STEP, _U, "per_matrix", "their steps [units, k]", tab="units"),
        Kind(
            ANOMALY,
            "anomaly",
            "fields",
            "where the first NaN/Inf appeared, with its inputs' statistics",
            fields=(
                "step",
                "nan_count",
                "inf_count",
                "input_count",
                "input_nan_count",
                "input_inf_count",
                "input_min",
                "input_max",
                "input_mean",
                "input_rms",
            ),
            tab="units",
        ),
        Kind(EXEC_ORDER, "anomaly", "vector", "module indices (metadata tree) in call order"),
        Kind(SIGMA_MAX, _S, "vector", "largest singular value [1]", tab="spectral"),
        Kind(FROBENIUS_NORM, _S, "vector", "Frobenius norm [1]", tab="spectral"),
        Kind(STABLE_RANK, _S, "vector", "||W||_F^2 / sigma_max^2 [1]", tab="spectral"),
        Kind(SPECTRUM, _S, "vector", "all singular values, descending", tab="spectral"),
        Kind(
            ESD,
            _S,
            "fields",
            "power-law fit of the eigenvalue spectral density",
            fields=("step", "alpha", "ks_distance", "xmin", "n_tail", "n_eigenvalues"),
            tab="spectral",
        ),
        Kind(FEATURE_EIGS, _S, "vector", "top eigenvalues of A^T A / rows", tab="spectral"),
        Kind(
            RANKME,
            _S,
            "fields",
            "RankMe effective rank of a row sample",
            fields=("step", "rankme", "rows"),
            tab="spectral",
        ),
        Kind(UPDATE_RATIO, _S, "vector", "||update|| / ||weight|| [1]", tab="spectral"),
        Kind(TRAJECTORY, _S, "vector", "coordinates on random directions", tab="spectral"),
        Kind(
            TRAJECTORY_PCA,
            _S,
            "fields",
            "a snapshot's coordinates on the PCA directions (step, then one per direction)",
            fields=("step",),
        ),
        Kind(FILTER_NORM, _S, "vector", "per-filter norms for filter normalisation"),
        Kind(LANDSCAPE, "landscape", "vector", "loss along x at one y of the grid"),
        Kind(LANDSCAPE_AXIS, "landscape", "vector", "grid coordinates (tensor x or y)"),
        Kind(GRAD_SQNORM_LOCAL, _R, "vector", "this rank's |g|^2 per DDP bucket"),
        Kind(GRAD_SQNORM_RANK_MEAN, _R, "vector", "mean over ranks of |g|^2 per bucket"),
        Kind(GRAD_SQNORM_AVG, _R, "vector", "|mean over ranks of g|^2 per bucket"),
        Kind(GRAD_DIVERSITY, _R, "vector", "sum_i |g_i|^2 / |sum_i g_i|^2 [1]"),
        Kind(GNS_G2, _R, "vector", "|G|^2 (McCandlish et al. 2018) [1]"),
        Kind(GNS_TRACE_SIGMA, _R, "vector", "tr(Sigma) [1]"),
        Kind(GNS_B_SIMPLE, _R, "vector", "B_simple = tr(Sigma) / |G|^2 [1]"),
    )
}


def _names(*, family: str | None = None, shape: str | None = None) -> tuple[str, ...]:
    return tuple(
        k.name
        for k in KINDS.values()
        if (family is None or k.family == family) and (shape is None or k.shape == shape)
    )


TENSOR_KINDS = tuple(k.name for k in KINDS.values() if k.flags)
HISTOGRAM_KINDS = _names(shape="histogram")  # rows with a histogram: tensor summaries
# per-unit rows in the order capture writes a module's block (stats.units' act/grad blocks)
UNIT_ACT_KINDS = (UNIT_MEAN, UNIT_SQ_MEAN, UNIT_FIRING, UNIT_SATURATED, UNIT_MAX)
UNIT_GRAD_KINDS = (UNIT_GRAD_RMS, UNIT_ATTR, UNIT_ATTR_ABS)
UNIT_KINDS = UNIT_ACT_KINDS + UNIT_GRAD_KINDS
UNIT_TOPK_KINDS = (UNIT_TOPK_VALUE, UNIT_TOPK_INDEX, UNIT_TOPK_STEP)
ANOMALY_KINDS = (ANOMALY, EXEC_ORDER)
SPECTRAL_KINDS = _names(family=_S)
RANK_KINDS = tuple(k.name for k in KINDS.values() if k.family == _R and k.shape != "histogram")
LANDSCAPE_KINDS = _names(family="landscape")
DERIVED_KINDS = tuple(
    k.name for k in KINDS.values() if not k.flags and k.shape != "histogram" and k.name != SCALAR
)
# the histogram kinds a cross-rank merge takes by default: the activations and their gradients
# differ between ranks; weights and all-reduced gradients are copies (counted once per rank)
DEFAULT_MERGE_KINDS = (ACTIVATION, ACTIVATION_GRAD)

# the scalar names whose presence opens the viewer's spectral tab (capture/spectral.py)
SPECTRAL_SCALAR_PREFIXES = ("gns/", "hessian/")


def tab_kinds(tab: str) -> frozenset[str]:
    """The kinds whose presence opens viewer tab ``tab`` (``units``, ``spectral``)."""
    return frozenset(k.name for k in KINDS.values() if k.tab == tab)


def is_tensor_kind(kind: str) -> bool:
    """True for rows that summarise one of the model's tensors (the only rows that flag)."""
    k = KINDS.get(kind)
    return k is not None and k.flags


def is_histogram_kind(kind: str) -> bool:
    """True for tensor-summary rows (with a histogram), flagging or not."""
    k = KINDS.get(kind)
    return k is not None and k.shape == "histogram"


def family(kind: str) -> str:
    """``tensor``, ``scalar``, ``unit``, ``anomaly``, ``spectral``, ``rank``, ``landscape`` or
    ``other`` (a kind this version does not know: a reader skips it, it never flags)."""
    k = KINDS.get(kind)
    if k is not None:
        return k.family
    return "unit" if kind.startswith("unit_") else "other"


# ---- fields rows: written and read by name -------------------------------------------------
def pack(kind: str, values: Mapping[str, float]) -> list[float]:
    """The ``values`` of a ``fields`` row of ``kind`` in the registry's order; a field not given
    is NaN, a name the kind does not have raises ``ValueError`` naming it."""
    names = KINDS[kind].fields
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"{kind} rows have no field(s) {sorted(unknown)}; fields: {names}")
    return [float(values.get(n, math.nan)) for n in names]


def unpack(kind: str, values: Sequence[float] | None) -> dict[str, float]:
    """A ``fields`` row's ``values`` by name. Every field of the kind is present: one missing
    from a shorter row (an older writer) is NaN; values past the known fields (a newer writer,
    or the open tail of ``trajectory_pca``: see ``tail``) are not in the dict."""
    names = KINDS[kind].fields
    vals = list(values or [])
    out: dict[str, float] = {n: float(vals[i]) if i < len(vals) else math.nan
                             for i, n in enumerate(names)}  # fmt: skip
    return out


def tail(kind: str, values: Sequence[float] | None) -> list[float]:
    """The values after a ``fields`` row's named fields (``trajectory_pca``: the coordinates)."""
    return list(values or [])[len(KINDS[kind].fields) :]


# ---- table helpers --------------------------------------------------------------------------
def _kind_column(table: pa.Table) -> pa.ChunkedArray:
    col = table.column("kind")
    return col.cast(pa.string()) if pa.types.is_dictionary(col.type) else col


def rows_of(table: pa.Table, kinds: Iterable[str]) -> pa.Table:
    """The rows of ``table`` whose kind is one of ``kinds``."""
    if table.num_rows == 0:
        return table
    return table.filter(pc.is_in(_kind_column(table), pa.array(list(kinds), pa.string())))


def tensor_rows(table: pa.Table) -> pa.Table:
    """The rows of ``table`` that summarise the model's tensors (``TENSOR_KINDS``)."""
    return rows_of(table, TENSOR_KINDS)


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


# ---- saturation: one definition for the per-unit rows and the viewer's flag ---------------------
# A bounded nonlinearity's output is saturated within SATURATION_MARGIN of a bound: |y| >= 0.97
# for tanh-like outputs in [-1, 1], y <= 0.03 or y >= 0.97 for sigmoid-like outputs in [0, 1].
# For the ReLU family (per-unit rows only) saturated means an output of exactly 0 (and >= 6 for
# ReLU6): the viewer's module flag calls that "dead" instead.
SATURATION_MARGIN = 0.03
TANH_SATURATION = 1.0 - SATURATION_MARGIN
SIGMOID_SATURATION = (SATURATION_MARGIN, 1.0 - SATURATION_MARGIN)
# torch.nn class name -> its nonlinearity (``stats.units.saturation_bounds`` knows each): capture
# maps its modules' classes by name, the viewer the type names of the trace's module tree
NONLINEARITIES: dict[str, str] = {
    "Tanh": "tanh",
    "Hardtanh": "hardtanh",
    "Softsign": "softsign",
    "Sigmoid": "sigmoid",
    "Hardsigmoid": "hardsigmoid",
    "ReLU": "relu",
    "ReLU6": "relu6",
}
TANH_LIKE = frozenset({"tanh", "hardtanh", "softsign"})  # outputs in [-1, 1]
SIGMOID_LIKE = frozenset({"sigmoid", "hardsigmoid"})  # outputs in [0, 1]


def saturation_family(module_type: str) -> str | None:
    """``tanh`` (outputs in [-1, 1]) or ``sigmoid`` (in [0, 1]) for a module type whose output
    saturates within ``SATURATION_MARGIN`` of a bound, else None."""
    nl = NONLINEARITIES.get(module_type)
    return "tanh" if nl in TANH_LIKE else "sigmoid" if nl in SIGMOID_LIKE else None


__all__ = [
    "ANOMALY_KINDS",
    "DEFAULT_MERGE_KINDS",
    "DERIVED_KINDS",
    "HISTOGRAM_KINDS",
    "KINDS",
    "LANDSCAPE_KINDS",
    "RANK_KINDS",
    "NONLINEARITIES",
    "SATURATION_MARGIN",
    "SIGMOID_LIKE",
    "SIGMOID_SATURATION",
    "TANH_LIKE",
    "TANH_SATURATION",
    "SCALAR_KIND",
    "SPECTRAL_KINDS",
    "SPECTRAL_SCALAR_PREFIXES",
    "TENSOR_KINDS",
    "UNIT_ACT_KINDS",
    "UNIT_GRAD_KINDS",
    "UNIT_KINDS",
    "UNIT_TOPK_KINDS",
    "Kind",
    "culprit",
    "family",
    "is_histogram_kind",
    "is_tensor_kind",
    "nonfinite_mask",
    "pack",
    "rows_of",
    "saturation_family",
    "tab_kinds",
    "tail",
    "tensor_rows",
    "unpack",
]
