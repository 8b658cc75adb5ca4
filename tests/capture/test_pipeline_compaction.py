"""The writer's two compaction paths give the same trace: the native CPU pass, and the device-op
path CUDA runs (forced on CPU banks here), which gathers the non-zero buckets with torch ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from _capture_support import MLP, mlp_batch

import dnntrace
from dnntrace.capture.pipeline import Pipeline


def _trace(path: Path, steps: int = 4, nan_at: int = 2) -> tuple[pa.Table, dict]:  # type: ignore[type-arg]
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with dnntrace.enable(model, path) as tr:
        for i in range(steps):
            x, y = mlp_batch(g)
            x[0, 0] = float("nan") if i == nan_at else x[0, 0]
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            tr.log_scalar("loss", loss.detach())  # a tensor scalar: copied with the rows
            tr.record_vector("0", "unit_test", "", torch.arange(5.0) * i)
            opt.step()
    stats = tr.stats()
    table = dnntrace.load(path).table.drop_columns(["wall_time_s"])
    return table, stats


def test_device_op_compaction_equals_native(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    native, st_native = _trace(tmp_path / "native.arrow")
    monkeypatch.setattr(Pipeline, "device_ops", True)
    device, st_device = _trace(tmp_path / "device.arrow")
    assert native.num_rows == device.num_rows > 0
    for name in native.column_names:
        a = native.column(name).to_pylist()
        b = device.column(name).to_pylist()
        assert [str(v) for v in a] == [str(v) for v in b], name  # NaN == NaN as text
    assert st_native["steps_written"] == st_device["steps_written"] == 4
    # both count what the CUDA path moves: far less than the whole bank per step
    for st in (st_native, st_device):
        per_step = st["bytes_to_host"] / st["steps_written"]
        assert 0 < per_step < 0.2 * st["bank_bytes"]
    kinds = set(native.column("kind").to_pylist())
    assert {"activation", "weight_grad", "scalar", "unit_test"} <= kinds


@pytest.mark.parametrize(
    ("coalesce_s", "initial_window", "max_window"),
    [(0.0, 0, 1 << 24), (100.0, 1 << 20, 1 << 24), (100.0, 64, 1 << 24), (0.0, 0, 64)],
    ids=[
        "one-step-batches-grown-window",
        "one-batch-in-the-window",
        "one-batch-too-big",
        "capped-window-never-used",
    ],
)
def test_the_writers_reused_window_gives_the_same_trace(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    coalesce_s: float,
    initial_window: int,
    max_window: int,
) -> None:
    """Histogram (bucket, count) pairs go to two buffers reused from record batch to record
    batch (grown after a batch that did not fit, which got fresh arrays): the trace equals the
    device-op path's, which does not use them. coalesce_s=0 writes each step alone (the window
    is grown after the first); a long one writes all steps in one batch at close (their pairs
    back to back in the window, or not fitting)."""
    monkeypatch.setattr(Pipeline, "coalesce_s", coalesce_s)
    monkeypatch.setattr(Pipeline, "initial_window", initial_window)
    monkeypatch.setattr(Pipeline, "max_window", max_window)
    used = []
    joined = Pipeline._joined

    def spy(self: Pipeline, pieces, key, window):  # type: ignore[no-untyped-def]
        out = joined(self, pieces, key, window)
        if key == "values":
            used.append(len(out) > 0 and np.shares_memory(out, self._window))
        else:  # the bucket indices lie in their window exactly when the counts lie in theirs
            assert used[-1] == (len(out) > 0 and np.shares_memory(out, self._window_index))
        return out

    monkeypatch.setattr(Pipeline, "_joined", spy)
    native, st = _trace(tmp_path / "native.arrow", 8, nan_at=6)
    if max_window < 1 << 24:  # a step's spans never fit: no window is kept
        assert not any(used) and "writer_window" not in st["memory_bytes"]
    elif coalesce_s == 0.0:
        assert st["batches"] == st["steps_written"] >= 2  # (a step may drop on a slow machine)
        assert not used[0] and any(used[1:])
        assert 0 < st["memory_bytes"]["writer_window"] <= 4 * max_window
    else:
        assert st["batches"] == 1 and used == [initial_window > 64]
    monkeypatch.setattr(Pipeline, "device_ops", True)
    device, _ = _trace(tmp_path / "device.arrow", 8, nan_at=6)
    assert native.num_rows == device.num_rows > 0
    for name in native.column_names:
        a = native.column(name).to_pylist()
        b = device.column(name).to_pylist()
        assert [str(v) for v in a] == [str(v) for v in b], name
