"""NaN/Inf origin: a NaN planted inside one layer of a real model is traced back to that layer
(forward execution order, then backward order), in the three modes."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dnntrace
from dnntrace.capture.anomaly import AnomalyWatch
from dnntrace.capture.tracer import AnomalyError
from dnntrace.storage.schema import ANOMALY_FIELDS


class Encoder(nn.Module):
    """A small transformer classifier; ``head`` is defined before the blocks but runs last."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.embed = nn.Linear(4, 16)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean(1))


def _train(model: nn.Module, path: Path, steps: int, bad_step: int, plant, **opts):  # noqa: ANN001, ANN201
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    opts = {"activations_every": 1, **opts}
    tr = dnntrace.enable(model, path, host_buffers=64, **opts)
    done = []
    try:
        for i in range(steps):
            if i == bad_step:
                plant()
            loss = model(torch.randn(4, 5, 4, generator=g)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done.append(i)
    finally:
        tr.close()
    return tr, done


def _plant_in_linear1(model: Encoder) -> None:
    with torch.no_grad():
        model.blocks[1].linear1.weight[3, 2] = float("nan")


def test_on_anomaly_checks_every_step_under_the_default_set(tmp_path: Path) -> None:
    # the default set records activations every 10th step; a watch for NaN must not wait for
    # step 10 to find a NaN planted at step 3: on_anomaly= makes the activation cadence `every`
    torch.manual_seed(0)
    model = Encoder()
    path = tmp_path / "t.arrow"
    tr, done = _train(
        model, path, 6, 3, lambda: _plant_in_linear1(model), on_anomaly="record",
        activations_every=None,
    )  # fmt: skip
    assert tr.config.activation_cadence == 1
    assert dnntrace.load(path).metadata["options"]["activations_every"] == 1
    watch = next(e for e in tr.extensions if isinstance(e, AnomalyWatch))
    assert watch.found is not None and watch.found["step"] == 3
    assert watch.found["forward"]["module"] == "blocks.1.linear1"
    # without a watch the default cadence stands
    plain = dnntrace.enable(Encoder(), tmp_path / "plain.arrow")
    plain.close()
    assert plain.config.activation_cadence == 10


def test_planted_nan_names_the_layer_and_step_record(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Encoder()
    path = tmp_path / "t.arrow"
    tr, done = _train(model, path, 5, 2, lambda: _plant_in_linear1(model), on_anomaly="record")
    assert done == [0, 1, 2, 3, 4]
    watch = next(e for e in tr.extensions if isinstance(e, AnomalyWatch))
    found = watch.found
    assert found is not None and found["step"] == 2
    assert found["forward"]["module"] == "blocks.1.linear1"
    assert found["forward"]["nan_count"] > 0
    # its input is the output of the module that ran before it (finite)
    assert found["input_source"] == "output of 'blocks.1.norm1'"
    assert found["forward_inputs"]["nan_count"] == 0 and math.isfinite(
        found["forward_inputs"]["rms"]
    )
    # backward order: the first module reached by a non-finite gradient is the head
    assert found["backward"]["module"] == "head"
    t = dnntrace.load(path)
    rows = t.select(kind="anomaly").to_pylist()
    by_dir = {r["tensor"]: r for r in rows}
    assert by_dir["forward"]["module"] == "blocks.1.linear1" and by_dir["forward"]["step"] == 2
    vals = dict(zip(ANOMALY_FIELDS, by_dir["forward"]["values"], strict=True))
    assert vals["step"] == 2 and vals["nan_count"] > 0 and vals["input_nan_count"] == 0
    # the model-order reader names the head (defined first); execution order is stored
    order = t.select(kind="exec_order", tensor="forward").column("values").to_pylist()[0]
    names = [m["name"] for m in t.metadata["modules"]]
    fwd = [names[int(i)] for i in order]
    assert fwd.index("embed") < fwd.index("blocks.1.linear1") < fwd.index("head")


def test_raise_names_module_and_step_and_keeps_the_trace(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Encoder()
    path = tmp_path / "t.arrow"
    with pytest.raises(AnomalyError, match=r"step 3 in module 'blocks.1.linear1'") as ei:
        _train(model, path, 6, 3, lambda: _plant_in_linear1(model), on_anomaly="raise")
    assert ei.value.found["step"] == 3
    t = dnntrace.load(path)  # written and closed before the raise
    assert not t.truncated
    assert list(t.steps) == [0, 1, 2, 3]
    assert t.select(kind="anomaly", module="blocks.1.linear1").num_rows == 1


def test_warn_once_with_input_rows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 1))

    def plant() -> None:
        with torch.no_grad():
            model[2].bias[0] = float("inf")

    def run() -> None:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with dnntrace.enable(
            model,
            tmp_path / "t.arrow",
            host_buffers=64,
            activations_every=1,
            extensions=[AnomalyWatch("warn", inputs=True)],
        ):
            for i in range(4):
                if i == 1:
                    plant()
                model(torch.randn(12, 4)).sum().backward()
                opt.step()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "step 1 in module '2'" in msgs[0] and "input rows" in msgs[0]
    t = dnntrace.load(tmp_path / "t.arrow")
    inp = t.select(kind="input", module="2", step=1).to_pylist()[0]
    assert inp["nan_count"] == 0 and inp["count"] == 12 * 8
    r = t.select(kind="anomaly", tensor="forward").to_pylist()[0]
    vals = dict(zip(ANOMALY_FIELDS, r["values"], strict=True))
    assert vals["inf_count"] == 12 and vals["input_count"] == 96
    assert vals["input_min"] == pytest.approx(inp["min"]) and vals["input_max"] == pytest.approx(
        inp["max"]
    )


def test_finite_training_reports_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Encoder()
    tr, _ = _train(model, tmp_path / "t.arrow", 3, -1, lambda: None, on_anomaly="raise")
    assert next(e for e in tr.extensions if isinstance(e, AnomalyWatch)).found is None
    t = dnntrace.load(tmp_path / "t.arrow")
    assert t.select(kind="anomaly").num_rows == 0
    # written once: the order never changed (and the tracer's first_call row)
    assert t.select(kind="exec_order", tensor="forward").num_rows == 1
    assert t.select(kind="exec_order", tensor="backward").num_rows == 1


def test_bad_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_anomaly must be one of"):
        dnntrace.enable(nn.Linear(2, 2), tmp_path / "t.arrow", on_anomaly="explode")
