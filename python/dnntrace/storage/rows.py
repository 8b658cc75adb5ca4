"""Turn native stat-bank rows (counts int64[n, width], moments float64[n, 8]) into trace columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ..sketch import layout as L
from ..sketch.layout import Layout
from ..sketch.merge import finite_of_counts
from . import kinds as K
from .schema import BASE_SCHEMA

# trace column -> index in a slot's counts row
HEADER_COLUMNS = {
    "count": L.COUNT,
    "nan_count": L.NAN,
    "posinf_count": L.POSINF,
    "neginf_count": L.NEGINF,
    "zero_count": L.ZEROS,
    "negative_count": L.NEGATIVES,
    "underflow_pos_count": L.UNDER_POS,
    "underflow_neg_count": L.UNDER_NEG,
    "overflow_pos_count": L.OVER_POS,
    "overflow_neg_count": L.OVER_NEG,
    "calls": L.CALLS,
}


def sparse_hist(hist: np.ndarray) -> tuple[pa.ListArray, pa.ListArray]:
    """Dense histograms ``[n, bins]`` as the trace stores them: per row, the non-zero buckets
    (``list<uint16>``, ascending) and their counts (``list<uint32>``), vectorised."""
    n, bins = hist.shape
    if bins > 1 << 16:
        raise ValueError(f"{bins} buckets per row do not fit uint16 bucket indices")
    row, col = np.nonzero(hist)
    values = hist[row, col]
    if values.size and (values.max() > np.iinfo(np.uint32).max or values.min() < 0):
        raise OverflowError("a histogram bucket exceeds 2**32 - 1 in one step")
    return pair_lists(np.bincount(row, minlength=n), col.astype(np.uint16), values)


def pair_lists(
    lengths: np.ndarray, bucket: np.ndarray, count: np.ndarray
) -> tuple[pa.ListArray, pa.ListArray]:
    """The ``hist_bucket`` and ``hist`` columns of rows holding ``lengths[i]`` of the
    (bucket, count) pairs, back to back."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    off = pa.array(offsets)
    return (
        pa.ListArray.from_arrays(off, pa.array(np.asarray(bucket, np.uint16), pa.uint16())),
        pa.ListArray.from_arrays(off, pa.array(np.asarray(count, np.uint32), pa.uint32())),
    )


def _values_array(values: Sequence[np.ndarray | None] | None, n: int) -> pa.Array:
    if values is None:
        return pa.nulls(n, pa.list_(pa.float32()))
    if len(values) != n:
        raise ValueError(f"values has {len(values)} entries for {n} rows")
    lengths = np.array([-1 if v is None else np.asarray(v).size for v in values], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.maximum(lengths, 0), out=offsets[1:])
    flat = [np.asarray(v, dtype=np.float32).reshape(-1) for v in values if v is not None]
    data = np.concatenate(flat) if flat else np.zeros(0, np.float32)
    mask = pa.array(lengths < 0) if (lengths < 0).any() else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(data, pa.float32()), mask=mask)


def vector_state(
    values: Sequence[np.ndarray], layout: Layout, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """State rows for vector rows: count = number of values, NaN/Inf counted, finite moments.

    ``width``: columns of the counts returned (default the layout's; ``L.HEADER`` gives the header
    only, for ``state_to_batch(..., hist=...)``): vector rows carry no histogram."""
    n = len(values)
    counts = np.zeros((n, layout.width if width is None else width), np.int64)
    moments = np.zeros((n, L.NUM_MOMENTS))
    moments[:, L.MIN] = np.inf
    moments[:, L.MAX] = -np.inf
    if n == 0:
        return counts, moments
    arrays = [np.asarray(v).reshape(-1) for v in values]
    sizes = np.array([a.size for a in arrays], np.int64)
    counts[:, L.COUNT] = sizes
    counts[:, L.CALLS] = 1
    # rows of one length (typically every statistic of one module) are reduced as a matrix
    for size in np.unique(sizes):
        idx = np.flatnonzero(sizes == size)
        if size == 0:
            continue
        a = np.stack([arrays[i] for i in idx]).astype(np.float64, copy=False)
        fin = np.isfinite(a)
        counts[idx, L.NAN] = np.isnan(a).sum(1)
        counts[idx, L.POSINF] = (a == np.inf).sum(1)
        counts[idx, L.NEGINF] = (a == -np.inf).sum(1)
        counts[idx, L.ZEROS] = (a == 0).sum(1)
        counts[idx, L.NEGATIVES] = (a < 0).sum(1)
        f = np.where(fin, a, 0.0)
        moments[idx, L.SUM] = f.sum(1)
        moments[idx, L.SUMSQ] = (f * f).sum(1)
        moments[idx, L.MIN] = np.where(fin, a, np.inf).min(1)
        moments[idx, L.MAX] = np.where(fin, a, -np.inf).max(1)
    return counts, moments


def hist_with_empty(
    buckets: pa.ListArray, counts: pa.ListArray, extra: int
) -> tuple[pa.ListArray, pa.ListArray]:
    """``sparse_hist``'s lists extended by ``extra`` rows without histogram."""
    if extra == 0:
        return buckets, counts
    ends = counts.offsets.to_numpy()
    off = pa.array(np.concatenate([ends, np.full(extra, ends[-1], ends.dtype)]))
    return (
        pa.ListArray.from_arrays(off, buckets.values),
        pa.ListArray.from_arrays(off, counts.values),
    )


def label_columns(
    labels: Sequence[tuple[str, str, str, str]], meta: Sequence[tuple[str, tuple[int, ...]]]
) -> dict[str, pa.Array]:
    """The label columns of rows labelled (module, kind, tensor, phase) with (dtype, shape), as
    plain arrays for ``state_to_batch(columns=...)`` (the writer caches them across steps)."""
    n = len(labels)
    return {
        "module": pa.array([lb[0] for lb in labels], pa.string()),
        "kind": pa.array([lb[1] for lb in labels], pa.string()),
        "tensor": pa.array([lb[2] for lb in labels], pa.string()),
        "phase": pa.array([lb[3] for lb in labels], pa.string()),
        "dtype": pa.array([m[0] for m in meta], pa.string()),
        "shape": pa.array([list(m[1]) for m in meta], pa.list_(pa.int64())),
        "numel": pa.array(np.array([int(np.prod(m[1])) for m in meta], np.int64).reshape(n)),
    }


def state_to_batch(
    counts: np.ndarray,
    moments: np.ndarray,
    layout: Layout,
    *,
    step: int | np.ndarray,
    module: Sequence[str] = (),
    kind: Sequence[str] = (),
    tensor: Sequence[str] = (),
    dtype: Sequence[str] = (),
    shape: Sequence[Sequence[int]] = (),
    phase: str | Sequence[str] = "train",
    rank: int = 0,
    wall_time_s: float | np.ndarray = 0.0,
    values: Sequence[np.ndarray | None] | None = None,
    hist: tuple[pa.ListArray, pa.ListArray] | None = None,
    columns: dict[str, pa.Array] | None = None,
) -> pa.RecordBatch:
    """A record batch of the trace schema from ``n`` slot rows and their labels.

    ``columns``: the label columns from ``label_columns`` instead of module ... shape.
    ``values`` gives vector rows their per-unit values (``None`` for ordinary tensor rows).
    ``hist``: the rows' histograms already in ``sparse_hist`` form (bucket lists, count lists);
    ``counts`` then needs only the header columns (``L.HEADER``)."""
    counts = np.asarray(counts, dtype=np.int64)
    moments = np.asarray(moments, dtype=np.float64)
    n = counts.shape[0]
    width = L.HEADER if hist is not None else layout.width
    if (
        counts.ndim != 2
        or counts.shape[0] != n
        or counts.shape[1] < width
        or (hist is None and counts.shape[1] != width)
        or moments.shape != (n, L.NUM_MOMENTS)
    ):
        raise ValueError(
            f"state rows of shape {counts.shape}/{moments.shape} do not fit layout {layout}"
        )
    has = finite_of_counts(counts) > 0
    mn = np.where(has, moments[:, L.MIN], np.nan)
    mx = np.where(has, moments[:, L.MAX], np.nan)
    buckets, lists = sparse_hist(counts[:, L.HEADER :]) if hist is None else hist
    if len(buckets) != n or len(lists) != n:
        raise ValueError(f"hist has {len(buckets)}/{len(lists)} rows for {n} state rows")
    cols: dict[str, Any] = {
        "step": np.broadcast_to(np.asarray(step, dtype=np.int64), (n,)),
        "rank": np.full(n, rank, dtype=np.int32),
        "wall_time_s": np.broadcast_to(np.asarray(wall_time_s, dtype=np.float64), (n,)),
    }
    if columns is not None:
        cols.update(columns)
    else:
        cols.update(
            {
                "phase": [phase] * n if isinstance(phase, str) else list(phase),
                "module": list(module),
                "kind": list(kind),
                "tensor": list(tensor),
                "dtype": list(dtype),
                "shape": [list(s) for s in shape],
                "numel": np.array([int(np.prod(s)) for s in shape], dtype=np.int64),
            }
        )
    for name, idx in HEADER_COLUMNS.items():
        cols[name] = counts[:, idx]
    cols["min"] = mn
    cols["max"] = mx
    cols["sum"] = moments[:, L.SUM] + moments[:, L.SUM_COMP]
    cols["sumsq"] = moments[:, L.SUMSQ] + moments[:, L.SUMSQ_COMP]
    cols["absmax"] = np.where(has, np.maximum(np.abs(mn), np.abs(mx)), np.nan)
    cols["k"] = np.full(n, layout.k, np.int8)
    cols["emin"] = np.full(n, layout.emin, np.int16)
    cols["octaves"] = np.full(n, layout.octaves, np.int16)
    cols["hist_bucket"] = buckets
    cols["hist"] = lists
    cols["values"] = _values_array(values, n)
    arrays = []
    for field in BASE_SCHEMA:
        v = cols[field.name]
        if isinstance(v, pa.Array):
            if pa.types.is_dictionary(field.type) and not pa.types.is_dictionary(v.type):
                v = v.dictionary_encode()
            arrays.append(v.cast(field.type) if v.type != field.type else v)
        elif pa.types.is_dictionary(field.type):
            arrays.append(pa.array(v, type=pa.string()).dictionary_encode().cast(field.type))
        else:
            arrays.append(pa.array(v, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=BASE_SCHEMA)


def scalar_state(
    values: Sequence[float], layout: Layout, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """State rows (counts, moments) of scalar values; the raw value, finite or not, is the sum.
    ``width`` as in ``vector_state``."""
    n = len(values)
    counts = np.zeros((n, layout.width if width is None else width), np.int64)
    counts[:, L.COUNT] = 1
    counts[:, L.CALLS] = 1
    v = np.asarray(values, dtype=np.float64).reshape(n)
    fin = np.isfinite(v)
    counts[:, L.NAN] = np.isnan(v)
    counts[:, L.POSINF] = v == np.inf
    counts[:, L.NEGINF] = v == -np.inf
    counts[:, L.ZEROS] = v == 0
    counts[:, L.NEGATIVES] = v < 0
    moments = np.zeros((n, L.NUM_MOMENTS))
    moments[:, L.SUM] = v
    moments[:, L.SUMSQ] = np.where(fin, v * v, 0.0)
    moments[:, L.MIN] = np.where(fin, v, np.inf)
    moments[:, L.MAX] = np.where(fin, v, -np.inf)
    return counts, moments


def scalar_batch(
    step: int,
    names: Sequence[str],
    values: Sequence[float],
    *,
    phase: str = "train",
    rank: int = 0,
    wall_time_s: float = 0.0,
    layout: Layout | None = None,
) -> pa.RecordBatch:
    """Rows of kind ``scalar`` (loss, learning rate, ...)."""
    layout = layout or Layout()
    n = len(names)
    counts, moments = scalar_state(values, layout)
    return state_to_batch(
        counts,
        moments,
        layout,
        step=step,
        module=[""] * n,
        kind=[K.SCALAR] * n,
        tensor=list(names),
        dtype=["float64"] * n,
        shape=[()] * n,
        phase=phase,
        rank=rank,
        wall_time_s=wall_time_s,
    )
