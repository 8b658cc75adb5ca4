"""Read a trace file: memory-mapped, batch by batch, tolerant of a torn last batch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..sketch import layout as L
from ..sketch.layout import Layout
from ..sketch.merge import empty_moments, merge_rows
from ..sketch.summary import Summary
from . import kinds as K
from .kinds import culprit, nonfinite_mask, tensor_rows
from .rows import HEADER_COLUMNS, pair_lists
from .schema import BASE_SCHEMA, COUNT_COLUMNS, TraceError, read_metadata


def read_table(path: str | os.PathLike[str]) -> tuple[pa.Table, dict[str, Any], bool]:
    """(table, metadata, truncated). Raises ``TraceError`` with a one-line message."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise TraceError(f"{p}: no such file")
    if os.path.isdir(p):
        raise TraceError(f"{p}: is a folder, not a trace file")
    if os.path.getsize(p) == 0:
        raise TraceError(f"{p}: empty file (no Arrow stream header)")
    try:
        source = pa.memory_map(p, "r")
    except OSError as e:
        raise TraceError(f"{p}: cannot open ({e.strerror or e})") from None
    try:
        reader = pa.ipc.open_stream(source)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise TraceError(f"{p}: not an Arrow IPC stream ({_one_line(e)})") from None
    meta = read_metadata(reader.schema, p)
    batches = []
    truncated = False
    while True:
        try:
            batches.append(reader.read_next_batch())
        except StopIteration:
            break
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError, EOFError):
            truncated = True  # a torn last message: keep every complete batch before it
            break
    table = pa.Table.from_batches(batches, schema=reader.schema)
    try:
        if meta.get("schema_version") == 1:
            table = v1_to_v2(table)
        for field in BASE_SCHEMA:  # columns added since the file was written (nullable): nulls
            if table.schema.get_field_index(field.name) < 0:
                table = table.append_column(field, pa.nulls(table.num_rows, field.type))
        check_histograms(table)
    except (ValueError, KeyError, pa.ArrowException) as e:
        raise TraceError(f"{p}: {_one_line(e)}") from None
    return table, meta, truncated


def _layout_bins(table: pa.Table) -> np.ndarray:
    """Each row's number of histogram buckets, ``2 * octaves * 2**k``; ``ValueError`` for a
    row whose layout is invalid."""
    k = table.column("k").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    octaves = table.column("octaves").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    bad = (k < 0) | (k > 7) | (octaves < 1) | (octaves > 254)
    if bad.any():
        raise ValueError(f"row {int(np.argmax(bad))} has a histogram with an invalid layout")
    return 2 * octaves << k


def _chunk_rows(chunk: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, ends): a list chunk's values and where each of its rows ends in them."""
    offs = chunk.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = chunk.values.to_numpy(zero_copy_only=False)[offs[0] : offs[-1]]
    return values, offs[1:] - offs[0]


def check_histograms(table: pa.Table) -> None:
    """``ValueError`` naming the problem unless every row's ``hist_bucket`` and ``hist`` are
    lists of one length whose buckets lie inside the row's layout (a file is untrusted input:
    a bad bucket must not land in another row or column). Chunk by chunk; a chunk whose
    buckets all fit its smallest layout needs no per-pair work."""
    if table.num_rows == 0:
        return
    buckets, counts = table.column("hist_bucket"), table.column("hist")
    lb = pc.list_value_length(buckets).fill_null(0).to_numpy(zero_copy_only=False)
    lc = pc.list_value_length(counts).fill_null(0).to_numpy(zero_copy_only=False)
    if not np.array_equal(lb, lc):
        raise ValueError(f"hist_bucket and hist differ in length in row {int(np.argmax(lb != lc))}")
    if not lb.any():
        return
    bins = _layout_bins(table)
    row0 = 0
    for chunk in buckets.chunks:
        n = len(chunk)
        values, ends = _chunk_rows(chunk)
        b = bins[row0 : row0 + n]
        if values.size and (int(values.min()) < 0 or int(values.max()) >= int(b.min())):
            row = np.searchsorted(ends, np.arange(values.size), side="right")
            bad = (values < 0) | (values >= b[row])
            if bad.any():
                r = row0 + int(row[np.argmax(bad)])
                raise ValueError(
                    f"row {r} lists a histogram bucket outside its {int(bins[r])} buckets"
                )
        row0 += n


def v1_to_v2(table: pa.Table) -> pa.Table:
    """A version-1 table (each histogram one dense span: ``hist_offset`` + ``hist``) with
    version 2's histogram columns (``hist_bucket`` + ``hist``: the non-zero buckets and their
    counts), in the same place; every other column as it was. Chunk by chunk, indexing only
    the non-zero counts (about a sixth of a span)."""
    if "hist_offset" not in table.column_names:
        return table
    at = table.schema.get_field_index("hist_offset")
    first = table.column("hist_offset").to_numpy(zero_copy_only=False).astype(np.int64)
    bins = _layout_bins(table) if table.num_rows else np.zeros(0, np.int64)
    out_b, out_c = [], []
    row0 = 0
    for chunk in table.column("hist").chunks:
        n = len(chunk)
        values, ends = _chunk_rows(chunk)
        pos = np.flatnonzero(values)
        row = np.searchsorted(ends, pos, side="right")  # the row of each non-zero count
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        bucket = first[row0 + row] + pos - starts[row]
        bad = (bucket < 0) | (bucket >= bins[row0 + row])
        if bad.any():
            r = row0 + int(row[np.argmax(bad)])
            raise ValueError(f"row {r}'s histogram span leaves its {int(bins[r])} buckets")
        b, c = pair_lists(np.bincount(row, minlength=n), bucket, values[pos])
        out_b.append(b)
        out_c.append(c)
        row0 += n
    table = table.remove_column(table.schema.get_field_index("hist"))
    field_b, field_c = BASE_SCHEMA.field("hist_bucket"), BASE_SCHEMA.field("hist")
    table = table.set_column(at, field_b, pa.chunked_array(out_b, field_b.type))
    return table.add_column(at + 1, field_c, pa.chunked_array(out_c, field_c.type))


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class Trace:
    """A trace file opened for reading. ``table`` is a memory-mapped pyarrow Table."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.table, self.metadata, self.truncated = read_table(self.path)

    # ---- descriptive -------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        lay = self.metadata.get("layout") or {}
        return Layout(**{k: int(v) for k, v in lay.items()}) if lay else Layout()

    @cached_property
    def module_tree(self) -> list[dict[str, Any]]:
        return list(self.metadata.get("modules", []))

    @cached_property
    def modules(self) -> list[str]:
        """Module paths with rows, in execution order (``execution_order``), then any others
        in model order and by first row."""
        present = self._unique("module")
        have = set(present)
        order = [m for m in self.execution_order if m in have]
        seen = set(order)
        tree = [m["name"] for m in self.module_tree if m["name"] in have and m["name"] not in seen]
        seen.update(tree)
        return order + tree + [m for m in present if m not in seen]

    @cached_property
    def execution_order(self) -> list[str]:
        """The modules of the tree (metadata), ordered as the forward pass ran them: each by
        the first time its forward hook (or a descendant's) fired, a parent just before its
        first child, the root first; modules that never ran keep their model order, last.

        The order comes from the tracer's ``exec_order``/``first_call`` rows (each step's
        modules called for the first time), else, in older traces, from the anomaly tracer's
        ``exec_order``/``forward`` row, else from the order of the ``activation`` rows: the
        tracer allocates a row slot the first time a module's forward hook fires, and writes
        rows in slot order. A module that never
        ran but whose ancestor did follows that ancestor."""
        tree = [m["name"] for m in self.module_tree]
        fired: list[str] = []
        t = self.table
        if t.num_rows:
            kind = t.column("kind").cast(pa.string())
            tensor = t.column("tensor").cast(pa.string())
            ex = t.filter(pc.and_(pc.equal(kind, K.EXEC_ORDER), pc.equal(tensor, K.EXEC_FORWARD)))
            calls = t.filter(
                pc.and_(pc.equal(kind, K.EXEC_ORDER), pc.equal(tensor, K.EXEC_FIRST_CALL))
            )
            if calls.num_rows and tree:
                # the tracer's own record: each step's modules called for the first time
                steps = calls.column("step").to_pylist()
                vals = calls.column("values").to_pylist()
                for _, v in sorted(zip(steps, vals, strict=True), key=lambda sv: sv[0]):
                    fired += [tree[int(i)] for i in v or [] if 0 <= int(i) < len(tree)]
            elif ex.num_rows and tree:
                idx = ex.column("values")[0].as_py() or []
                fired = [tree[int(i)] for i in idx if 0 <= int(i) < len(tree)]
            else:
                act = t.filter(pc.equal(kind, K.ACTIVATION)).column("module").cast(pa.string())
                fired = [m for m in pc.unique(act).to_pylist() if m is not None]
        if not tree:
            return fired
        first: dict[str, int] = {}
        for i, m in enumerate(fired):
            parts = m.split(".") if m else []
            for k in range(len(parts) + 1):  # the module and every ancestor, root included
                a = ".".join(parts[:k])
                if a not in first:
                    first[a] = i
        pos = {m: i for i, m in enumerate(tree)}
        never = len(fired) + 1

        def key(m: str) -> tuple[int, int, int]:
            depth = m.count(".") + (m != "")
            a = m
            while a not in first and a:  # never ran (weights used functionally): after the
                a = a.rpartition(".")[0]  # nearest ancestor that ran
            ran = m in first or (a != "" and a in first)  # under the root alone: never ran
            return (first[a], depth, pos[m]) if ran else (never, 0, pos[m])

        return sorted(tree, key=key)

    @cached_property
    def steps(self) -> np.ndarray:
        if self.table.num_rows == 0:
            return np.zeros(0, np.int64)
        return np.unique(self.table.column("step").to_numpy())

    @cached_property
    def kinds(self) -> list[str]:
        return self._unique("kind")

    def _unique(self, name: str) -> list[str]:
        if self.table.num_rows == 0:
            return []
        col = self.table.column(name)
        vals = pc.unique(col.cast(pa.string()) if pa.types.is_dictionary(col.type) else col)
        return [v for v in vals.to_pylist() if v is not None]

    def to_pandas(self) -> Any:
        return self.table.to_pandas()

    # ---- statistics ------------------------------------------------------------------
    def select(
        self,
        module: str | None = None,
        kind: str | None = None,
        step: int | None = None,
        tensor: str | None = None,
        phase: str | None = None,
    ) -> pa.Table:
        t = self.table
        mask = None
        for name, val in (
            ("module", module),
            ("kind", kind),
            ("tensor", tensor),
            ("phase", phase),
            ("step", step),
        ):
            if val is None:
                continue
            col = t.column(name)
            if pa.types.is_dictionary(col.type):
                col = col.cast(pa.string())
            m = pc.equal(col, pa.scalar(val, col.type))
            mask = m if mask is None else pc.and_(mask, m)
        return t if mask is None else t.filter(mask)

    def summary(
        self,
        module: str,
        kind: str,
        step: int | None = None,
        *,
        tensor: str | None = None,
        phase: str | None = "train",
    ) -> Summary:
        """The ``Summary`` of the rows matching (merged over steps and tensors left
        unspecified), the same object ``dnntrace.summarize`` returns. Training rows by default,
        as ``quantiles``; ``phase="eval"`` for validation rows, ``None`` for both."""
        rows = self.select(module, kind, step, tensor, phase)
        if rows.num_rows == 0:
            raise KeyError(f"no rows for module={module!r} kind={kind!r} step={step!r}")
        return merge_table_rows(rows)[0]

    def quantiles(
        self,
        module: str,
        kind: str,
        qs: Sequence[float] = (0.01, 0.5, 0.99),
        *,
        tensor: str | None = None,
        phase: str | None = "train",
    ) -> pa.Table:
        """A table with one row per step: ``step`` and one column ``q<q>`` per quantile."""
        rows = self.select(module, kind, None, tensor, phase)
        ordered_steps, group = np.unique(rows.column("step").to_numpy(), return_inverse=True)
        merged = merge_table_rows(rows, group, ordered_steps.size)
        by_step = {int(s): m for s, m in zip(ordered_steps, merged, strict=True)}
        ordered = sorted(by_step)
        cols: dict[str, Any] = {"step": pa.array(ordered, pa.int64())}
        qa = np.asarray(qs, dtype=np.float64)
        vals = np.array([np.atleast_1d(by_step[s].quantile(qa)) for s in ordered]).reshape(
            len(ordered), qa.size
        )
        for i, q in enumerate(qa):
            cols[f"q{q:g}"] = pa.array(vals[:, i], pa.float64())
        return pa.table(cols)

    def anomalies(self) -> list[dict[str, Any]]:
        """First step with NaN or Inf per tensor kind (activation, activation_grad, weight,
        weight_grad), and the module at it that produced the value (``kinds.culprit``: none of
        its submodules is flagged, first in execution order). Vector rows (spectra, per-unit
        statistics) and scalars are not tensors of the model and are left out."""
        t = tensor_rows(self.table)  # derived rows (spectra, units) never flag: kinds.py
        if t.num_rows == 0:
            return []
        bad = nonfinite_mask(t)
        bad_rows = t.filter(bad)
        if bad_rows.num_rows == 0:
            return []
        order = {m: i for i, m in enumerate(self.modules)}
        out = []
        kinds = bad_rows.column("kind").cast(pa.string()).to_pylist()
        steps = bad_rows.column("step").to_pylist()
        mods = bad_rows.column("module").cast(pa.string()).to_pylist()
        nans = bad_rows.column("nan_count").to_pylist()
        infs = pc.add(bad_rows.column("posinf_count"), bad_rows.column("neginf_count")).to_pylist()
        for kind in sorted(set(kinds)):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            first_step = min(steps[i] for i in idx)
            at = [i for i in idx if steps[i] == first_step]
            first = at[culprit([mods[i] for i in at], order)]
            out.append(
                {
                    "kind": kind,
                    "step": first_step,
                    "module": mods[first],
                    "nan_count": nans[first],
                    "inf_count": infs[first],
                }
            )
        return sorted(out, key=lambda a: (a["step"], a["kind"]))


def _row_parts(
    rows: pa.Table,
) -> list[tuple[Layout, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]]:
    """The state rows of a trace table as stored: one ``(layout, row indices, header
    int64[n, HEADER], moments float64[n, 8], (start, stop, bucket, count))`` per layout present
    (usually one); row ``i``'s non-zero histogram buckets are ``bucket[start[i]:stop[i]]`` with
    counts ``count[start[i]:stop[i]]``. Sums come back with zero compensation (a row stores
    ``sum + compensation``); an absent min/max (stored as NaN) is the empty state's
    ``+inf``/``-inf``."""
    n = rows.num_rows
    if n == 0:
        return []
    keys = np.stack(
        [rows.column(c).to_numpy().astype(np.int64) for c in ("k", "emin", "octaves")], 1
    )
    buckets = rows.column("hist_bucket").combine_chunks()
    counts = rows.column("hist").combine_chunks()
    off = counts.offsets.to_numpy().astype(np.int64)
    if not np.array_equal(buckets.offsets.to_numpy(), counts.offsets.to_numpy()):
        raise TraceError("hist_bucket and hist differ in length in some row")
    bucket_vals = buckets.values.to_numpy(zero_copy_only=False)
    count_vals = counts.values.to_numpy(zero_copy_only=False)
    header = np.zeros((n, L.HEADER), np.int64)
    for name, col in HEADER_COLUMNS.items():
        header[:, col] = rows.column(name).to_numpy()
    moments = empty_moments(n)
    moments[:, L.SUM] = rows.column("sum").to_numpy(zero_copy_only=False)
    moments[:, L.SUMSQ] = rows.column("sumsq").to_numpy(zero_copy_only=False)
    mn = rows.column("min").to_numpy(zero_copy_only=False)
    mx = rows.column("max").to_numpy(zero_copy_only=False)
    moments[:, L.MIN] = np.where(np.isnan(mn), np.inf, mn)
    moments[:, L.MAX] = np.where(np.isnan(mx), -np.inf, mx)
    out = []
    uniq = np.unique(keys, axis=0)
    for key in uniq:
        idx = np.arange(n) if len(uniq) == 1 else np.flatnonzero((keys == key).all(axis=1))
        lay = Layout(*(int(v) for v in key))
        pairs = (off[idx], off[idx + 1], bucket_vals, count_vals)
        out.append((lay, idx, header[idx], moments[idx], pairs))
    return out


def rows_to_summaries(rows: pa.Table) -> list[Summary]:
    """One ``Summary`` per row of a trace table."""
    out: list[Summary | None] = [None] * rows.num_rows
    for lay, idx, header, moments, (start, stop, bucket, count) in _row_parts(rows):
        for j, i in enumerate(idx):
            counts = np.zeros(lay.width, np.int64)
            counts[: L.HEADER] = header[j]
            a, b = int(start[j]), int(stop[j])
            np.add.at(counts, L.HEADER + bucket[a:b].astype(np.int64), count[a:b])
            out[i] = Summary(counts, moments[j], lay)
    return out  # type: ignore[return-value]


def merge_table_state(
    rows: pa.Table,
    group: np.ndarray | None = None,
    ngroups: int | None = None,
    order: np.ndarray | None = None,
) -> list[tuple[Layout, np.ndarray, np.ndarray, np.ndarray]]:
    """The rows of a trace table merged per ``group`` (``int[n]`` in ``0 .. ngroups-1``;
    default: all in one) by the one row merge, ``sketch.merge_rows``, on the stored
    (bucket, count) pairs: ``(layout, group ids, counts [k, width], moments [k, 8])`` per
    layout present, ids ascending. A group's rows merge in table order, or in the order of the
    permutation ``order`` (row indices). Rows of one group must share a layout (``ValueError``
    naming both)."""
    n = rows.num_rows
    g = np.zeros(n, np.int64) if group is None else np.asarray(group, np.int64)
    ng = (int(g.max()) + 1 if n else 0) if ngroups is None else int(ngroups)
    if n and (g.min() < 0 or g.max() >= ng):
        raise ValueError(f"merge_table_state: group ids must be in 0..{ng - 1}")
    out = []
    seen: dict[int, Layout] = {}
    at = None
    if order is not None:  # each row's place in the merge order
        at = np.empty(n, np.int64)
        at[np.asarray(order, np.int64)] = np.arange(n)
    for lay, idx, header, moments, pairs in _row_parts(rows):
        if at is not None:
            p = np.argsort(at[idx], kind="stable")
            idx, header, moments = idx[p], header[p], moments[p]
            pairs = (pairs[0][p], pairs[1][p], pairs[2], pairs[3])
        ids = np.unique(g[idx])
        for gi in ids.tolist():
            if seen.setdefault(gi, lay) != lay:
                raise ValueError(
                    f"cannot merge summaries with different layouts: {seen[gi]} vs {lay}"
                )
        dense = np.searchsorted(ids, g[idx])  # only the groups present: no empty rows
        c, m = merge_rows(header, moments, dense, ids.size, hist=pairs, width=lay.width)
        out.append((lay, ids, c, m))
    return out


def merge_table_rows(
    rows: pa.Table, group: np.ndarray | None = None, ngroups: int | None = None
) -> list[Summary]:
    """``merge_table_state`` as one ``Summary`` per group."""
    if ngroups is None:
        ngroups = int(np.max(group)) + 1 if group is not None and rows.num_rows else 1
    out: list[Summary | None] = [None] * ngroups
    for lay, ids, c, m in merge_table_state(rows, group, ngroups):
        for j, gi in enumerate(ids.tolist()):
            out[gi] = Summary(c[j], m[j], lay)
    return out  # type: ignore[return-value]


def load(path: str | os.PathLike[str]) -> Trace:
    """Open a trace file. Raises ``TraceError`` (a ``ValueError``) with a one-line message."""
    return Trace(path)


__all__ = [
    "COUNT_COLUMNS",
    "Trace",
    "TraceError",
    "load",
    "merge_table_rows",
    "merge_table_state",
    "read_table",
    "rows_to_summaries",
]
