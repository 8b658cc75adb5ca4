"""A tracer-written trace read by plain pyarrow, pandas, polars and DuckDB (no dnntrace)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
import torch
from _capture_support import SmallCNN, cnn_batch, train

import dnntrace


@pytest.fixture(scope="module")
def cnn_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("interop") / "cnn.arrow"
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dnntrace.enable(model, path, optimizer=opt) as tr:
        train(model, opt, cnn_batch, 3)
    df = dnntrace.load(path).to_pandas()
    kinds = df["kind"].astype(str).value_counts().to_dict()
    assert tr.stats()["rows"] == len(df)
    return path, kinds


def test_pyarrow_reads_batch_by_batch(cnn_trace: tuple[Path, dict[str, int]]) -> None:
    path, kinds = cnn_trace
    with pa.memory_map(str(path)) as src:
        reader = pa.ipc.open_stream(src)
        batches = [b for b in reader if b.num_rows]  # an empty first batch is allowed
        schema = reader.schema
    # a record batch holds one or more whole steps, in order (steps that complete within the
    # writer's coalescing window share a batch)
    steps = [sorted(set(b.column("step").to_pylist())) for b in batches]
    assert [s for st in steps for s in st] == [0, 1, 2]
    for b in batches:
        st = b.column("step").to_numpy()
        assert (st[1:] >= st[:-1]).all()
    assert b"dnntrace" in schema.metadata
    table = pa.Table.from_batches(batches)
    assert table.num_rows == sum(kinds.values())
    assert table.schema.field("module").type == pa.dictionary(pa.int32(), pa.string())


def test_pandas_polars_duckdb(cnn_trace: tuple[Path, dict[str, int]]) -> None:
    path, kinds = cnn_trace
    with pa.memory_map(str(path)) as src:
        table = pa.ipc.open_stream(src).read_all()
    df = table.to_pandas()
    assert isinstance(df, pd.DataFrame)
    assert df["kind"].astype(str).value_counts().to_dict() == kinds
    assert (df["count"] >= df["nan_count"]).all()

    pdf = pl.read_ipc_stream(path)
    assert pdf.height == table.num_rows
    counts = pdf.group_by(pl.col("kind").cast(pl.String)).len()
    assert dict(counts.iter_rows()) == kinds
    assert pl.from_arrow(table).height == table.num_rows

    tbl = table  # noqa: F841  (DuckDB finds the Arrow table by its Python name)
    got = duckdb.sql("select kind, count(*) from tbl group by kind").fetchall()
    assert {str(k): n for k, n in got} == kinds
    top = duckdb.sql(
        "select module, max(absmax) from tbl where kind = 'activation' group by module "
        "order by 2 desc limit 1"
    ).fetchall()
    assert top and top[0][1] > 0
