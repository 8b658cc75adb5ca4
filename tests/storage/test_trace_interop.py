"""A trace is a plain Arrow IPC stream: pyarrow, pandas, polars and DuckDB read it without
dnntrace (checked in a fresh interpreter that never imports it)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"

_READER = r"""
import sys
import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa

path = sys.argv[1]
with pa.memory_map(path) as src:
    table = pa.ipc.open_stream(src).read_all()
assert table.num_rows == 18, table.num_rows
assert b"dnntrace" in table.schema.metadata

df = table.to_pandas()
assert isinstance(df["module"].dtype, pd.CategoricalDtype)
assert df.loc[df["kind"] == "scalar", "sum"].round(6).tolist() == [1.0, 0.5, 0.333333]

pdf = pl.read_ipc_stream(path)
acts = pdf.filter((pl.col("kind") == "activation") & (pl.col("step") == 2))
assert sorted(acts["module"].to_list()) == ["fc1", "fc2"]
assert acts.filter(pl.col("module") == "fc2")["nan_count"].to_list() == [1]
assert pl.from_arrow(table).height == 18

rel = duckdb.from_arrow(table)
rows = duckdb.sql(
    "select module, sum(count) as n from rel where kind = 'weight' group by module order by module"
).fetchall()
assert rows == [("fc1", 96), ("fc2", 48)], rows
q = "select sum(list_sum(hist)) + sum(zero_count) from rel where kind = 'weight'"
hist = duckdb.sql(q).fetchall()[0][0]
assert hist == 96 + 48, hist  # every weight is in the histogram or an exact zero
if "hist_bucket" in table.column_names:  # version 2: the non-zero buckets and their counts
    pairs = duckdb.sql(
        "select unnest(hist_bucket) as b, unnest(hist) as n from rel where kind = 'weight'"
    ).fetchall()
    assert len(pairs) > 50 and all(0 <= b < 8192 and n > 0 for b, n in pairs), pairs[:5]
    zeros = duckdb.sql("select sum(zero_count) from rel where kind = 'weight'").fetchall()[0][0]
    assert sum(n for _, n in pairs) + zeros == 96 + 48

assert not any(m == "dnntrace" or m.startswith("dnntrace.") for m in sys.modules)
print("ok")
"""


@pytest.mark.parametrize("version", [1, 2])
def test_plain_readers_read_a_trace_without_dnntrace(version: int):
    out = subprocess.run(
        [sys.executable, "-c", _READER, str(DATA / f"trace_v{version}.arrow")],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
