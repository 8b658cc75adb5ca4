"""The writer's two compaction paths give the same trace: the native CPU pass, and the device-op
path CUDA runs (forced on CPU banks here), whose non-zero buckets are rebuilt into spans."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from _capture_support import MLP, mlp_batch

import dnntrace
from dnntrace.capture.pipeline import Pipeline


def _trace(path: Path) -> tuple[pa.Table, dict]:  # type: ignore[type-arg]
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with dnntrace.enable(model, path) as tr:
        for i in range(4):
            x, y = mlp_batch(g)
            x[0, 0] = float("nan") if i == 2 else x[0, 0]
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
