"""Trace file format: schema, writer, reader. Imports only numpy and pyarrow (no torch)."""

from ..sketch.layout import Layout, row_index
from ..sketch.summary import Summary
from .reader import Trace, load, read_table, rows_to_summaries
from .rows import scalar_batch, state_to_batch
from .schema import SCHEMA_VERSION, TraceError, make_schema, read_metadata
from .writer import TraceWriter

__all__ = [
    "SCHEMA_VERSION",
    "Layout",
    "Summary",
    "Trace",
    "TraceError",
    "TraceWriter",
    "load",
    "make_schema",
    "read_metadata",
    "read_table",
    "row_index",
    "rows_to_summaries",
    "scalar_batch",
    "state_to_batch",
]
