"""Traces for the viewer tests built with the real writer: a copy of a trace with modules renamed,
metadata changed and extra rows (vector rows such as a spectrum's power-law fit) appended."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from dnntrace.storage import TraceWriter, load, state_to_batch
from dnntrace.storage.rows import vector_state


def vector_rows(
    trace_path: str | os.PathLike[str],
    rows: Sequence[tuple[int, str, str, str, Sequence[float]]],
) -> pa.RecordBatch:
    """A batch of vector rows ``(step, module, kind, tensor, values)`` (``trace_path``'s
    layout)."""
    lay = load(trace_path).layout
    values = [np.asarray(v, np.float64) for *_, v in rows]
    counts, moments = vector_state(values, lay)
    return state_to_batch(
        counts,
        moments,
        lay,
        step=np.array([r[0] for r in rows], np.int64),
        module=[r[1] for r in rows],
        kind=[r[2] for r in rows],
        tensor=[r[3] for r in rows],
        dtype=["float32"] * len(rows),
        shape=[(len(v),) for v in values],
        values=values,
    )


def rewrite(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    rename: Mapping[str, str] | None = None,
    extra: Sequence[pa.RecordBatch] = (),
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """``src`` written again to ``dst`` by ``TraceWriter``: module names mapped through
    ``rename`` (rows and the metadata's module tree), ``extra`` batches appended."""
    tr = load(src)
    rename = dict(rename or {})
    meta = dict(tr.metadata)
    meta.pop("schema_version", None)
    meta["modules"] = [
        {**m, "name": rename.get(m["name"], m["name"])} for m in meta.get("modules", [])
    ]
    meta.update(metadata or {})
    table = tr.table
    if rename:
        mods = table.column("module").cast(pa.string()).to_pylist()
        col = pa.array([rename.get(m, m) for m in mods], pa.string()).dictionary_encode()
        i = table.schema.get_field_index("module")
        table = table.set_column(i, table.schema.field(i), col.cast(table.schema.field(i).type))
    with TraceWriter(dst, meta) as w:
        for b in table.to_batches():
            w.write(b)
        for b in extra:
            w.write(b)
    return os.fspath(dst)
