"""The Arrow schema of a trace file, format version 2 (see docs/FORMAT.md)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from . import kinds as _K
from .kinds import SCALAR_KIND, TENSOR_KINDS

SCHEMA_VERSION = 2
# Versions this dnntrace reads: version 1 stored each histogram as one dense span
# (``hist_offset`` + ``hist``); the reader turns it into version 2's pairs (reader.v1_to_v2).
READABLE_VERSIONS = (1, 2)
METADATA_KEY = b"dnntrace"

KINDS = (*TENSOR_KINDS, SCALAR_KIND)  # the histogram kinds; vector kinds: see kinds.py

# The values of an ``anomaly`` vector row, in order: the registry's fields (kinds.pack/unpack).
ANOMALY_FIELDS = _K.KINDS[_K.ANOMALY].fields
PHASES = ("train", "eval")

COUNT_COLUMNS = (
    "count",
    "nan_count",
    "posinf_count",
    "neginf_count",
    "zero_count",
    "negative_count",
    "underflow_pos_count",
    "underflow_neg_count",
    "overflow_pos_count",
    "overflow_neg_count",
)

_FIELDS = [
    pa.field("step", pa.int64(), nullable=False),
    pa.field("phase", pa.dictionary(pa.int8(), pa.string())),
    pa.field("rank", pa.int32()),
    pa.field("wall_time_s", pa.float64()),
    pa.field("module", pa.dictionary(pa.int32(), pa.string())),
    pa.field("kind", pa.dictionary(pa.int8(), pa.string())),
    pa.field("tensor", pa.dictionary(pa.int32(), pa.string())),
    pa.field("dtype", pa.dictionary(pa.int8(), pa.string())),
    pa.field("shape", pa.list_(pa.int64())),
    pa.field("numel", pa.int64()),
    pa.field("calls", pa.int64()),
    *[pa.field(c, pa.int64()) for c in COUNT_COLUMNS],
    pa.field("min", pa.float64()),
    pa.field("max", pa.float64()),
    pa.field("sum", pa.float64()),
    pa.field("sumsq", pa.float64()),
    pa.field("absmax", pa.float64()),
    pa.field("k", pa.int8()),
    pa.field("emin", pa.int16()),
    pa.field("octaves", pa.int16()),
    # the non-zero histogram buckets of the row: bucket indices (ascending) and their counts
    pa.field("hist_bucket", pa.list_(pa.uint16())),
    pa.field("hist", pa.list_(pa.uint32())),
    # Vector rows (per-unit statistics, spectra, ...): one value per unit; null for tensor rows.
    pa.field("values", pa.list_(pa.float32()), nullable=True),
]

BASE_SCHEMA = pa.schema(_FIELDS)


def make_schema(metadata: dict[str, Any]) -> pa.Schema:
    """The file schema with ``metadata`` (JSON-able) under the ``dnntrace`` key."""
    meta = {"schema_version": SCHEMA_VERSION, **metadata}
    return BASE_SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta).encode()})


class TraceError(ValueError):
    """A trace file that cannot be read; the message is one line naming the problem."""


def read_metadata(schema: pa.Schema, source: str = "trace") -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TraceError(f"{source}: Arrow stream without dnntrace metadata (not a dnntrace trace)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise TraceError(f"{source}: dnntrace metadata is not valid JSON ({e})") from None
    version = meta.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise TraceError(
            f"{source}: unknown trace schema version {version!r} "
            f"(this dnntrace reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    return dict(meta)
