"""Modules come in execution order: the forward pass's order as the tracer recorded it (row
slots, or the anomaly tracer's exec_order row), parents before their first child, modules that
never ran after their nearest ancestor that did, or last."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import dnntrace  # noqa: E402
from dnntrace.storage import load  # noqa: E402


class Backwards(nn.Module):
    """Defined c, b, a; runs a, b, c; ``unused`` never runs; ``block`` is a container."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Linear(6, 2)
        self.block = nn.Sequential(nn.Linear(4, 5), nn.Tanh())  # runs second: b
        self.unused = nn.Linear(3, 3)
        self.a = nn.Linear(3, 4)
        self.head = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.head(self.block(self.a(x))))


EXPECTED = ["", "a", "block", "block.0", "block.1", "head", "c", "unused"]


@pytest.mark.parametrize("on_anomaly", [None, "record"])
def test_modules_in_execution_order(tmp_path: Path, on_anomaly: str | None) -> None:
    model = Backwards()
    path = tmp_path / "t.arrow"
    kw = {"on_anomaly": on_anomaly} if on_anomaly else {}
    with dnntrace.enable(model, str(path), **kw) as tr:
        for _ in range(3):
            model(torch.randn(8, 3)).sum().backward()
            tr.step()
    t = load(path)
    assert [m["name"] for m in t.module_tree][:3] == ["", "c", "block"]  # definition order
    assert t.execution_order == EXPECTED
    assert t.modules == [m for m in EXPECTED if m in set(t._unique("module"))]
    if on_anomaly:
        assert t.select(kind="exec_order").num_rows >= 1


def test_without_activation_rows_model_order(tmp_path: Path) -> None:
    model = Backwards()
    path = tmp_path / "w.arrow"
    with dnntrace.enable(model, str(path), activations=False, gradients=False) as tr:
        model(torch.randn(8, 3)).sum().backward()
        tr.step()
    t = load(path)
    assert t.execution_order == [m["name"] for m in t.module_tree]
