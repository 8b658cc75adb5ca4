"""Several trace files read as one data set: the rank files of a distributed run, or many runs.

``open_runs(source)`` takes a trace file, a folder of them (``rank0.arrow``, ``rank1.arrow``, ...,
``merged.arrow``; or a folder of such folders) or a list of these, and returns a ``RunSet``. Its
``table`` is every file's rows concatenated, with a ``run`` column in front (the rank folder's
name, or the file's stem for a lone file); ``rank`` is already a column (``-1`` for merged rows).
A file cut off mid-batch (a killed rank) yields its complete batches and is marked
``truncated``; a file without even a complete header is listed in ``skipped``.

``to_dask()`` gives a Dask dataframe whose partitions each read a run of record batches of one
file, so aggregations (Datashader's included) never hold more than a few batches per worker.
Imports numpy and pyarrow; dask only inside ``to_dask``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..sketch.summary import Summary
from . import kinds as K
from .files import MERGED_RANK, is_rank_file, is_trace_file
from .kinds import culprit, nonfinite_mask, tensor_rows
from .reader import merge_table_rows, merge_table_state, read_table
from .rows import state_to_batch
from .schema import BASE_SCHEMA, TraceError, read_metadata

LIST_COLUMNS = ("shape", "hist_bucket", "hist", "values")
_KEY = ("run", "step", "module", "kind", "tensor", "phase")


@dataclass(frozen=True)
class RunFile:
    """One trace file of a ``RunSet``."""

    path: str
    run: str
    rank: int
    world_size: int
    merged: bool
    metadata: dict[str, Any] = field(repr=False, compare=False)


def _expand(source: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(path, run name) of every trace file under ``source``."""
    p = os.fspath(source)
    if os.path.isfile(p):
        folder, name = os.path.split(os.path.abspath(p))
        run = os.path.basename(folder) if is_rank_file(name) else os.path.splitext(name)[0]
        return [(p, run)]
    if not os.path.isdir(p):
        raise TraceError(f"{p}: no such file or folder")
    files = sorted(os.path.join(p, f) for f in os.listdir(p) if is_trace_file(f))
    if not files:  # a folder of runs
        out: list[tuple[str, str]] = []
        for sub in sorted(os.listdir(p)):
            if os.path.isdir(os.path.join(p, sub)):
                out += _expand(os.path.join(p, sub))
        if not out:
            raise TraceError(f"{p}: no .arrow trace files in this folder or its subfolders")
        return out
    own = os.path.basename(os.path.abspath(p))
    if all(is_rank_file(f) for f in files):
        return [(f, own) for f in files]
    return [(f, os.path.splitext(os.path.basename(f))[0]) for f in files]


def _read_schema(path: str) -> pa.Schema:
    if os.path.getsize(path) == 0:
        raise TraceError(f"{path}: empty file (no Arrow stream header)")
    try:
        with pa.memory_map(path, "r") as src:
            return pa.ipc.open_stream(src).schema
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise TraceError(f"{path}: not an Arrow IPC stream ({e})") from None


class RunSet:
    """Trace files read together. ``files`` (``RunFile``), ``skipped`` ((path, reason) of files
    that could not be opened), ``table`` (all rows, lazily), ``truncated`` (paths cut short)."""

    def __init__(self, sources: Sequence[str | os.PathLike[str]]) -> None:
        found: list[tuple[str, str]] = []
        for s in sources:
            found += _expand(s)
        runs_of: dict[str, set[str]] = {}
        for path, run in found:
            runs_of.setdefault(run, set()).add(os.path.dirname(os.path.abspath(path)))
        self.files: list[RunFile] = []
        self.skipped: list[tuple[str, str]] = []
        for path, run in found:
            if len(runs_of[run]) > 1:  # the same name in two places: qualify by the parent
                parent = os.path.dirname(os.path.dirname(os.path.abspath(path)))
                run = f"{os.path.basename(parent)}/{run}"
            try:
                meta = read_metadata(_read_schema(path), path)
            except TraceError as e:
                self.skipped.append((path, str(e)))
                continue
            merged = bool(meta.get("merged", False))
            self.files.append(
                RunFile(
                    path,
                    run,
                    int(meta.get("rank", 0)),
                    int(meta.get("world_size", 1)),
                    merged,
                    meta,
                )
            )
        if not self.files:
            reasons = "; ".join(r for _, r in self.skipped) or "no trace files"
            raise TraceError(f"no readable trace file ({reasons})")
        self.truncated: list[str] = []

    # ---- descriptive ---------------------------------------------------------------------
    @property
    def runs(self) -> list[str]:
        return list(dict.fromkeys(f.run for f in self.files))

    def ranks(self, run: str | None = None) -> list[int]:
        """Ranks with a file (merged files excluded), ascending."""
        return sorted({f.rank for f in self.files if not f.merged and run in (None, f.run)})

    def world_size(self, run: str | None = None) -> int:
        return max(f.world_size for f in self.files if run in (None, f.run))

    @property
    def has_merged(self) -> bool:
        return any(f.merged for f in self.files)

    @cached_property
    def modules(self) -> list[str]:
        """Module names in model order (metadata of the first file that lists them)."""
        out: dict[str, None] = {}
        for f in self.files:
            for m in f.metadata.get("modules", []):
                out.setdefault(m["name"], None)
        return list(out)

    @cached_property
    def table(self) -> pa.Table:
        """Every file's rows, with a leading ``run`` column (dictionary string)."""
        parts = []
        for f in self.files:
            t, _, truncated = read_table(f.path)
            if truncated:
                self.truncated.append(f.path)
            parts.append(_with_run(t.replace_schema_metadata(None), f.run))
        return pa.concat_tables(parts)

    def _values(self, name: str) -> list[Any]:
        col = self.table.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(pa.string())
        return sorted(v for v in pc.unique(col).to_pylist() if v is not None)

    @property
    def kinds(self) -> list[str]:
        return list(self._values("kind"))

    @property
    def steps(self) -> np.ndarray:
        return np.asarray(self._values("step"), dtype=np.int64)

    def select(self, **where: Any) -> pa.Table:
        """Rows whose columns equal the given values (``run=``, ``rank=``, ``kind=``, ...); a
        list or tuple value matches any of its items."""
        t = self.table
        mask = None
        for name, val in where.items():
            if val is None:
                continue
            col = t.column(name)
            if pa.types.is_dictionary(col.type):
                col = col.cast(pa.string())
            vals = list(val) if isinstance(val, list | tuple | set) else [val]
            m = pc.is_in(col, pa.array(vals, col.type))
            mask = m if mask is None else pc.and_(mask, m)
        return t if mask is None else t.filter(mask)

    def to_pandas(self, columns: Sequence[str] | None = None) -> Any:
        t = self.table if columns is None else self.table.select(list(columns))
        return t.to_pandas()

    # ---- across ranks ------------------------------------------------------------------------
    def merged_summary(
        self,
        module: str,
        kind: str,
        step: int | None = None,
        *,
        run: str | None = None,
        tensor: str | None = None,
        phase: str | None = "train",
    ) -> Summary:
        """The exact merge over ranks (and over steps, tensors left unspecified) of the rank
        files' rows: counts and histograms add, min/max take the extremes."""
        rows = self._rank_rows().filter(
            _mask(self._rank_rows(), run=run, module=module, kind=kind, tensor=tensor,
                  phase=phase, step=step)
        )  # fmt: skip
        if rows.num_rows == 0:
            raise KeyError(f"no rank rows for module={module!r} kind={kind!r} step={step!r}")
        return merge_table_rows(rows)[0]

    def _rank_rows(self) -> pa.Table:
        return self.table.filter(pc.greater_equal(self.table.column("rank"), 0))

    def merged_table(self, kinds: Sequence[str] | None = None) -> pa.Table:
        """One row per (run, step, module, kind, tensor, phase): the exact merge over ranks of
        the rank files' tensor rows (vector and scalar rows are left out), with ``rank = -1``
        and the latest ``wall_time_s``. What ``merged.arrow`` holds, computed when reading."""
        t = self._rank_rows()
        t = t.filter(pc.is_null(t.column("values")))
        t = t.filter(pc.not_equal(t.column("kind").cast(pa.string()), K.SCALAR))
        if kinds is not None:
            t = t.filter(pc.is_in(t.column("kind").cast(pa.string()), pa.array(list(kinds))))
        if t.num_rows == 0:
            return _with_run(BASE_SCHEMA.empty_table(), "").slice(0, 0)
        keys = {k: t.column(k).cast(pa.string()).to_pylist() for k in _KEY if k != "step"}
        steps = t.column("step").to_pylist()
        groups: dict[tuple[Any, ...], int] = {}
        group = np.empty(t.num_rows, np.int64)
        for i in range(t.num_rows):
            key = (keys["run"][i], steps[i], keys["module"][i], keys["kind"][i],
                   keys["tensor"][i], keys["phase"][i])  # fmt: skip
            group[i] = groups.setdefault(key, len(groups))
        labels = list(groups)  # in first-row order
        wall = np.full(len(groups), -np.inf)
        np.maximum.at(wall, group, t.column("wall_time_s").to_numpy())
        first_row = np.full(len(groups), t.num_rows, np.int64)
        np.minimum.at(first_row, group, np.arange(t.num_rows))
        dtypes = t.column("dtype").cast(pa.string()).to_pylist()
        shapes = t.column("shape").to_pylist()
        # the one row merge (sketch.merge), each group's rows in rank order as RankMerge does
        by_rank = np.lexsort((t.column("rank").to_numpy(), group))
        parts, order = [], []
        for lay, ids, c, m in merge_table_state(t, group, len(groups), by_rank):
            lb = [labels[i] for i in ids.tolist()]
            i0 = first_row[ids].tolist()
            b = state_to_batch(
                c,
                m,
                lay,
                step=np.array([x[1] for x in lb], np.int64),
                module=[x[2] for x in lb],
                kind=[x[3] for x in lb],
                tensor=[x[4] for x in lb],
                phase=[x[5] for x in lb],
                dtype=[dtypes[i] for i in i0],
                shape=[shapes[i] for i in i0],
                rank=MERGED_RANK,
                wall_time_s=wall[ids],
            )
            run = pa.array([x[0] for x in lb], pa.string()).dictionary_encode()
            run = run.cast(pa.dictionary(pa.int32(), pa.string()))
            parts.append(pa.Table.from_batches([b]).add_column(0, "run", run))
            order.append(ids)
        out = pa.concat_tables(parts)
        return out if len(parts) == 1 else out.take(np.argsort(np.concatenate(order)))

    def first_nonfinite(self) -> list[dict[str, Any]]:
        """Per (run, rank): the first step with a NaN or Inf row, the module that produced it
        (``kinds.culprit``),
        the kind and the wall time; sorted so the first entry is the rank that went bad first."""
        t = tensor_rows(self._rank_rows())  # the model's tensors only (kinds.py)
        t = t.filter(nonfinite_mask(t))
        if t.num_rows == 0:
            return []
        order = {m: i for i, m in enumerate(self.modules)}
        rows = t.select(["run", "rank", "step", "module", "kind", "wall_time_s", "nan_count"])
        first: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in rows.to_pylist():
            at = first.setdefault((r["run"], r["rank"]), [r])
            if r["step"] < at[0]["step"]:
                at[:] = [r]
            elif r["step"] == at[0]["step"] and r is not at[0]:
                at.append(r)
        best = [at[culprit([r["module"] for r in at], order)] for at in first.values()]
        return sorted(best, key=lambda r: (r["run"], r["step"], r["wall_time_s"]))

    def step_times(self) -> pa.Table:
        """(run, rank, step, wall_time_s, lag_s): when each rank handed each step to its writer,
        and how far behind the earliest rank of that step it was (stragglers)."""
        t = self._rank_rows().select(["run", "rank", "step", "wall_time_s"])
        t = t.set_column(0, "run", t.column("run").cast(pa.string()))
        g = t.group_by(["run", "rank", "step"]).aggregate([("wall_time_s", "max")])
        g = g.rename_columns(["run", "rank", "step", "wall_time_s"])
        first = g.group_by(["run", "step"]).aggregate([("wall_time_s", "min")])
        first = first.rename_columns(["run", "step", "first_s"])
        j = g.join(first, ["run", "step"])
        j = j.append_column("lag_s", pc.subtract(j.column("wall_time_s"), j.column("first_s")))
        return j.drop_columns(["first_s"]).sort_by([("run", "ascending"), ("step", "ascending"),
                                                    ("rank", "ascending")])  # fmt: skip

    # ---- out of core -----------------------------------------------------------------------
    def partitions(self, batches_per_partition: int = 16) -> list[tuple[str, str, int, int]]:
        """(path, run, first batch, stop batch) of each Dask partition."""
        if batches_per_partition < 1:
            raise ValueError(f"batches_per_partition must be >= 1, got {batches_per_partition}")
        out = []
        for f in self.files:
            n = count_batches(f.path)
            for start in range(0, max(n, 1), batches_per_partition):
                out.append((f.path, f.run, start, min(n, start + batches_per_partition)))
        return out

    def to_dask(
        self,
        columns: Sequence[str] | None = None,
        *,
        batches_per_partition: int = 16,
    ) -> Any:
        """A ``dask.dataframe`` of the rows (list columns ``shape``/``hist``/``values`` left out
        unless named); string columns are plain strings; ``module_index`` is the module's place
        in model order (for heatmaps). Nothing is read until computed."""
        import dask.dataframe as dd

        cols = list(columns) if columns is not None else default_columns()
        modules = self.modules
        meta = _to_frame(_with_run(BASE_SCHEMA.empty_table(), ""), cols, modules)
        return dd.from_map(
            _read_partition,
            self.partitions(batches_per_partition),
            columns=cols,
            modules=modules,
            meta=meta,
            enforce_metadata=False,
        )


def default_columns() -> list[str]:
    """Columns of ``to_dask`` by default: all but the list columns, and ``module_index``."""
    return ["run"] + [f.name for f in BASE_SCHEMA if f.name not in LIST_COLUMNS] + ["module_index"]


def count_batches(path: str) -> int:
    """Complete record batches in a trace file (headers only; a torn tail ends the count)."""
    n = 0
    with pa.memory_map(path, "r") as src:
        reader = pa.ipc.MessageReader.open_stream(src)
        while True:
            try:
                msg = reader.read_next_message()
            except StopIteration:
                break
            except (pa.ArrowInvalid, pa.ArrowIOError, OSError, EOFError):
                break
            if msg.type == "record batch":
                n += 1
    return n


def read_batches(path: str, start: int, stop: int) -> pa.Table:
    """Record batches ``start <= i < stop`` of a trace file, decoding only those (and every
    dictionary message before them, so dictionary-encoded columns resolve)."""
    sink = pa.BufferOutputStream()
    i = 0
    schema: pa.Schema | None = None
    with pa.memory_map(path, "r") as src:
        reader = pa.ipc.MessageReader.open_stream(src)
        while i < stop:
            try:
                msg = reader.read_next_message()
            except StopIteration:
                break
            except (pa.ArrowInvalid, pa.ArrowIOError, OSError, EOFError):
                break
            if msg.type == "schema":
                msg.serialize_to(sink)
                continue
            if msg.type == "record batch":
                if i >= start:
                    msg.serialize_to(sink)
                i += 1
            else:  # dictionaries (and replacements) in stream order
                msg.serialize_to(sink)
        sink.write(b"\xff\xff\xff\xff\x00\x00\x00\x00")  # end of stream
        stream = pa.ipc.open_stream(sink.getvalue())
        schema = stream.schema
        table = stream.read_all()
    return table.replace_schema_metadata(None) if schema is not None else table


def _with_run(t: pa.Table, run: str) -> pa.Table:
    col = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(t.num_rows, np.int32)), pa.array([run], pa.string())
    )
    return t.add_column(0, pa.field("run", pa.dictionary(pa.int32(), pa.string())), col)


def _to_frame(t: pa.Table, columns: Sequence[str], modules: Sequence[str]) -> Any:
    order = {m: i for i, m in enumerate(modules)}
    out = {}
    for name in columns:
        if name == "module_index":
            mods = t.column("module").cast(pa.string()).to_pylist()
            out[name] = pa.array([order.get(m, -1) for m in mods], pa.int32())
            continue
        col = t.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(pa.string())
        out[name] = col
    return pa.table(out).to_pandas()


def _read_partition(
    part: tuple[str, str, int, int], columns: Sequence[str], modules: Sequence[str]
) -> Any:
    path, run, start, stop = part
    t = read_batches(path, start, stop) if stop > start else BASE_SCHEMA.empty_table()
    return _to_frame(_with_run(t, run), columns, modules)


def _mask(t: pa.Table, **where: Any) -> pa.Array:
    mask = pa.array(np.ones(t.num_rows, bool))
    for name, val in where.items():
        if val is None:
            continue
        col = t.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(pa.string())
        mask = pc.and_(mask, pc.equal(col, pa.scalar(val, col.type)))
    return mask


def open_runs(
    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | RunSet,
) -> RunSet:
    """A ``RunSet`` of a trace file, a folder of rank files / runs, or a list of these."""
    if isinstance(source, RunSet):
        return source
    if isinstance(source, str | os.PathLike):
        return RunSet([source])
    return RunSet(list(source))


def finite_count(t: pa.Table) -> pa.Array:
    """count − NaN − ±Inf per row."""
    return pc.subtract(
        pc.subtract(pc.subtract(t.column("count"), t.column("nan_count")),
                    t.column("posinf_count")), t.column("neginf_count"),
    )  # fmt: skip


__all__ = [
    "LIST_COLUMNS",
    "RunFile",
    "RunSet",
    "count_batches",
    "default_columns",
    "finite_count",
    "open_runs",
    "read_batches",
]
