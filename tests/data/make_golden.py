# Generator of tests/data/trace_v2.arrow (golden trace, format v2): python tests/data/make_golden.py
"""Writes a small trace with fixed content (no randomness, no clock, no host name) through the
public storage API, from states computed by the float64 reference (torch-free), as
``trace_v<current format version>.arrow``.

trace_v1.arrow was written by this script when the format was version 1 (before the nullable
``values`` column existed). Do not regenerate a file for a later format version: a new version
gets its own golden file, and every older one must keep reading with the same values. It prints
the values that tests/storage/test_trace_golden.py pins."""

from __future__ import annotations

import math
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for reference.py

from dnntrace.storage import Layout, TraceWriter, scalar_batch, state_to_batch  # noqa: E402
from dnntrace.storage.schema import SCHEMA_VERSION  # noqa: E402
from reference import tensor_summary_ref  # noqa: E402

LAYOUT = Layout(6, -48, 64)
METADATA = {
    "dnntrace_version": "0.1.0",
    "torch_version": "2.13.0+cpu",
    "created_unix_s": 1764172800.0,
    "host": "golden",
    "pid": 0,
    "rank": 0,
    "world_size": 1,
    "layout": LAYOUT.to_dict(),
    "options": {"every": 1, "activations": True, "gradients": True, "weights": True},
    "modules": [
        {"name": "", "type": "Net", "depth": 0, "params": {}},
        {"name": "fc1", "type": "Linear", "depth": 1, "params": {"weight": [8, 4], "bias": [8]}},
        {"name": "fc2", "type": "Linear", "depth": 1, "params": {"weight": [2, 8], "bias": [2]}},
    ],
}
ROWS = [  # module, kind, tensor, shape, scale
    ("fc1", "weight", "weight", (8, 4), 0.5),
    ("fc1", "weight_grad", "weight", (8, 4), 1e-3),
    ("fc1", "activation", "", (16, 8), 2.0),
    ("fc2", "weight", "weight", (2, 8), 0.25),
    ("fc2", "activation", "", (16, 2), 3.0),
]


def values(step: int, row: int, shape: tuple[int, ...], scale: float) -> np.ndarray:
    n = int(np.prod(shape))
    v = (np.sin(np.arange(n) * 0.37 + step + 10 * row) * scale).astype(np.float32)
    if ROWS[row][1] == "activation":
        v = np.maximum(v, np.float32(0))  # ReLU: exact zeros
    if step == 2 and row == 4:
        v[:3] = [math.nan, math.inf, -math.inf]  # an anomaly at the last step
    return v


def main() -> None:
    path = HERE / f"trace_v{SCHEMA_VERSION}.arrow"
    with TraceWriter(path, METADATA) as w:
        for step in range(3):
            counts, moments = [], []
            for r, (_, _, _, shape, scale) in enumerate(ROWS):
                c, m = tensor_summary_ref(
                    values(step, r, shape, scale), LAYOUT.k, LAYOUT.emin, LAYOUT.octaves
                )
                counts.append(c)
                moments.append(m)
            w.write(
                state_to_batch(
                    np.array(counts),
                    np.array(moments),
                    LAYOUT,
                    step=step,
                    module=[r[0] for r in ROWS],
                    kind=[r[1] for r in ROWS],
                    tensor=[r[2] for r in ROWS],
                    dtype=["float32"] * len(ROWS),
                    shape=[r[3] for r in ROWS],
                    wall_time_s=1764172800.0 + step,
                )
            )
            w.write(
                scalar_batch(step, ["loss"], [1.0 / (step + 1)], wall_time_s=1764172800.0 + step)
            )
    print(path, path.stat().st_size, "bytes")  # noqa: T201 - a generator script reports what it wrote
    v = values(2, 4, ROWS[4][3], ROWS[4][4]).astype(np.float64)
    fin = v[np.isfinite(v)]
    print(  # noqa: T201 - a generator script reports what it wrote
        "fc2 activation step 2: count",
        v.size,
        "zeros",
        int((v == 0).sum()),
        "sum",
        repr(math.fsum(fin)),
        "max",
        repr(float(fin.max())),
    )
    v = values(1, 0, ROWS[0][3], ROWS[0][4]).astype(np.float64)
    print(  # noqa: T201 - a generator script reports what it wrote
        "fc1 weight step 1: min",
        repr(float(v.min())),
        "max",
        repr(float(v.max())),
        "sum",
        repr(math.fsum(v)),
        "median",
        repr(float(np.quantile(v, 0.5, method="inverted_cdf"))),
    )


if __name__ == "__main__":
    main()
