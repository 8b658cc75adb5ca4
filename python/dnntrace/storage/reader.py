"""Read a trace file: memory-mapped, batch by batch, tolerant of a torn last batch."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import layout as L
from .kinds import culprit, nonfinite_mask, tensor_rows
from .layout import Layout
from .rows import HEADER_COLUMNS
from .schema import BASE_SCHEMA, COUNT_COLUMNS, TraceError, read_metadata
from .summary import Summary


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
    for field in BASE_SCHEMA:  # columns added since the file was written (nullable): nulls
        if table.schema.get_field_index(field.name) < 0:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table, meta, truncated


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
            ex = t.filter(pc.and_(pc.equal(kind, "exec_order"), pc.equal(tensor, "forward")))
            calls = t.filter(pc.and_(pc.equal(kind, "exec_order"), pc.equal(tensor, "first_call")))
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
                act = t.filter(pc.equal(kind, "activation")).column("module").cast(pa.string())
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
        return _merge(rows_to_summaries(rows))

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
        steps = rows.column("step").to_numpy()
        summaries = rows_to_summaries(rows)
        by_step: dict[int, Summary] = {}
        for s, summ in zip(steps, summaries, strict=True):
            by_step[int(s)] = by_step[int(s)].merge(summ) if int(s) in by_step else summ
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


def rows_to_summaries(rows: pa.Table) -> list[Summary]:
    """One ``Summary`` per row of a trace table."""
    n = rows.num_rows
    out: list[Summary] = []
    if n == 0:
        return out
    ks = rows.column("k").to_numpy()
    emins = rows.column("emin").to_numpy()
    octs = rows.column("octaves").to_numpy()
    offs = rows.column("hist_offset").to_numpy()
    hist = rows.column("hist").combine_chunks()
    hist_off = hist.offsets.to_numpy()
    hist_vals = hist.values.to_numpy(zero_copy_only=False)
    header = {name: rows.column(name).to_numpy() for name in HEADER_COLUMNS}
    s = rows.column("sum").to_numpy(zero_copy_only=False)
    ss = rows.column("sumsq").to_numpy(zero_copy_only=False)
    mn = rows.column("min").to_numpy(zero_copy_only=False)
    mx = rows.column("max").to_numpy(zero_copy_only=False)
    layouts: dict[tuple[int, int, int], Layout] = {}
    for i in range(n):
        key = (int(ks[i]), int(emins[i]), int(octs[i]))
        lay = layouts.get(key) or layouts.setdefault(key, Layout(*key))
        counts = np.zeros(lay.width, np.int64)
        for name, idx in HEADER_COLUMNS.items():
            counts[idx] = header[name][i]
        seg = hist_vals[hist_off[i] : hist_off[i + 1]]
        if seg.size:
            start = L.HEADER + int(offs[i])
            counts[start : start + seg.size] = seg
        m = np.zeros(L.NUM_MOMENTS)
        m[L.SUM], m[L.SUMSQ] = s[i], ss[i]
        m[L.MIN] = mn[i] if not np.isnan(mn[i]) else np.inf
        m[L.MAX] = mx[i] if not np.isnan(mx[i]) else -np.inf
        out.append(Summary(counts, m, lay))
    return out


def _merge(items: Iterable[Summary]) -> Summary:
    it = iter(items)
    acc = next(it)
    for s in it:
        acc = acc.merge(s)
    return acc


def load(path: str | os.PathLike[str]) -> Trace:
    """Open a trace file. Raises ``TraceError`` (a ``ValueError``) with a one-line message."""
    return Trace(path)


__all__ = ["COUNT_COLUMNS", "Trace", "TraceError", "load", "read_table", "rows_to_summaries"]
