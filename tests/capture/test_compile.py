"""torch.compile (fullgraph=True): activations recorded inside compiled graphs, in either order of
enable and compile and with model.compile(), compared with a float64 functional twin of the same
weights and inputs; what is not recorded there (output gradients, tuple outputs) is named in one
warning. aot_eager keeps most cases quick on 2 cores; one case runs inductor (C++ codegen)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from _capture_support import load_rows, one_row
from torch import nn
from torch.nn import functional as F

import dnntrace


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _twin(m: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The modules' outputs computed functionally in float64, from the same weights."""
    w = {k: v.detach().double() for k, v in m.state_dict().items()}
    h0 = F.linear(x.double(), w["0.weight"], w["0.bias"])
    h1 = torch.relu(h0)
    return {"0": h0, "1": h1, "2": F.linear(h1, w["2.weight"], w["2.bias"])}


@pytest.mark.parametrize(
    ("order", "backend"),
    [
        ("enable-compile", "aot_eager"),
        ("compile-enable", "aot_eager"),
        ("model.compile", "aot_eager"),
        ("enable-compile", "inductor"),
    ],
)
def test_compiled_graph_records_activations(order: str, backend: str, trace_path: Path) -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    if order == "compile-enable":
        run = torch.compile(m, fullgraph=True, backend=backend)
        tr = dnntrace.enable(run, trace_path)
    else:
        tr = dnntrace.enable(m, trace_path)
        if order == "model.compile":
            m.compile(fullgraph=True, backend=backend)
            run = m
        else:
            run = torch.compile(m, fullgraph=True, backend=backend)
    truth = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(4, 8, generator=g)
            truth.append(_twin(m, x))
            opt.zero_grad()
            run(x).sum().backward()
            opt.step()
        tr.close()
    ours = [str(w.message) for w in caught if "dnntrace" in str(w.message)]
    assert len(ours) == 1 and "output gradients (activation_grad rows)" in ours[0]  # once
    df = load_rows(trace_path)
    for step, t in enumerate(truth):
        for mod in ("0", "1", "2"):
            row = one_row(df, step=step, module=mod, kind="activation", phase="train")
            assert row["calls"] == 1 and row["count"] == t[mod].numel()
            assert row["nan_count"] == 0 and row["zero_count"] == (t[mod] == 0).sum()
            assert row["sum"] == pytest.approx(t[mod].sum().item(), rel=1e-5, abs=1e-5)
            assert row["max"] == pytest.approx(t[mod].max().item(), rel=1e-5)
    assert "activation_grad" not in set(df["kind"])  # lost, and said so
    wg = df[df["kind"] == "weight_grad"]
    assert sorted(set(wg["step"])) == [0, 1, 2]


# dynamo itself reads .grad of the tuple's non-leaf tensors when it wraps the hook's arguments
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_compiled_tuple_outputs_are_named_in_the_warning(trace_path: Path) -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.lin(x)
            return h, -h

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.pair(x)
            return a * b

    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with dnntrace.enable(m, trace_path, modules=["", "pair", "pair.lin"]):
        run = torch.compile(m, fullgraph=True, backend="aot_eager")
        run(torch.randn(2, 4)).sum().backward()
        with pytest.warns(RuntimeWarning, match=r"tuple/dict outputs of 1 modules \('pair'\)"):
            opt.step()
    df = load_rows(trace_path)
    lin = one_row(df, step=0, module="pair.lin", kind="activation")
    assert lin["calls"] == 1  # single-tensor outputs are still recorded
    assert df[(df["module"] == "pair") & (df["kind"] == "activation")].empty


def test_eager_rows_unchanged_by_preassigned_slots(trace_path: Path) -> None:
    m = _model()
    with dnntrace.enable(m, trace_path) as tr:
        m(torch.randn(2, 8))
        tr.step()
    df = load_rows(trace_path)
    acts = df[df["kind"].isin(["activation", "activation_grad"])]
    # only what ran is written: no rows for the unused eval / grad slots
    assert sorted(zip(acts["module"], acts["kind"], acts["phase"], strict=True)) == [
        ("", "activation", "train"), ("0", "activation", "train"),
        ("1", "activation", "train"), ("2", "activation", "train"),
    ]  # fmt: skip
