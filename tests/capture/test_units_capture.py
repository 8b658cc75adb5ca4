"""The per-unit extension end to end: rows in the trace against values recomputed from the
model's own activations; dead-ReLU detection; the axis rule; top-k with sample ids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dnntrace
from dnntrace.capture.units import UnitStats, plan_units


def _vectors(path: Path, kind: str, module: str) -> dict[int, np.ndarray]:
    t = dnntrace.load(path).select(kind=kind, module=module)
    steps = t.column("step").to_pylist()
    vals = t.column("values").to_pylist()
    return {s: np.asarray(v, np.float64) for s, v in zip(steps, vals, strict=True)}


def test_rows_match_the_model_activations(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    seen: dict[str, list[np.ndarray]] = {"pre": [], "grad": [], "tanh": []}

    def keep(name: str):  # noqa: ANN202
        def hook(mod, inp, out) -> None:  # noqa: ANN001
            seen[name].append(out.detach().double().numpy().copy())
            if name == "pre":
                out.register_hook(lambda g: seen["grad"].append(g.double().numpy().copy()))

        return hook

    m[0].register_forward_hook(keep("pre"))
    m[1].register_forward_hook(keep("tanh"))
    path = tmp_path / "t.arrow"
    with dnntrace.enable(m, path, host_buffers=64, units={"topk": 2, "every": 1}):
        for _ in range(3):
            x = 3 * torch.randn(16, 6)
            loss = m(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    pre, grad, th = seen["pre"], seen["grad"], seen["tanh"]
    lo = math.atanh(0.97)
    for kind, fn in [
        ("unit_mean", lambda s: pre[s].mean(0)),
        ("unit_sq_mean", lambda s: (pre[s] ** 2).mean(0)),
        ("unit_firing", lambda s: (pre[s] > 0).mean(0)),
        ("unit_saturated", lambda s: (np.abs(pre[s]) >= lo).mean(0)),
        ("unit_max", lambda s: pre[s].max(0)),
        ("unit_grad_rms", lambda s: np.sqrt((grad[s] ** 2).mean(0))),
        ("unit_attr", lambda s: (grad[s] * pre[s]).mean(0)),
        ("unit_attr_abs", lambda s: np.abs(grad[s] * pre[s]).mean(0)),
    ]:
        got = _vectors(path, kind, "0")
        assert sorted(got) == [0, 1, 2], kind
        for s in range(3):
            np.testing.assert_allclose(got[s], fn(s), rtol=1e-5, atol=1e-6, err_msg=kind)
    got = _vectors(path, "unit_saturated", "1")  # the Tanh's own outputs
    for s in range(3):
        np.testing.assert_allclose(got[s], (np.abs(th[s]) >= 0.97).mean(0), atol=1e-6)


def test_dead_relus_are_detected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    dead = [3, 7, 20]
    with torch.no_grad():
        m[0].bias[dead] = -100.0  # killed: never fire for inputs of this size
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    path = tmp_path / "t.arrow"
    with dnntrace.enable(m, path, host_buffers=64, units={"every": 1}):
        for _ in range(6):
            loss = m(torch.randn(64, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for module in ("0", "1"):
        firing = np.stack(list(_vectors(path, "unit_firing", module).values()))
        assert firing.shape == (6, 32)
        never = np.flatnonzero(firing.max(0) == 0)
        np.testing.assert_array_equal(never, dead)
        sat = np.stack(list(_vectors(path, "unit_saturated", module).values()))
        assert (sat[:, dead] == 1).all()  # ReLU family: saturated = output exactly 0
    # no gradient reaches the dead units' inputs, and their outputs carry no attribution
    g = np.stack(list(_vectors(path, "unit_grad_rms", "0").values()))
    assert (g[:, dead] == 0).all() and (np.delete(g, dead, axis=1) > 0).all()
    a = np.stack(list(_vectors(path, "unit_attr_abs", "1").values()))
    assert (a[:, dead] == 0).all() and (np.delete(a, dead, axis=1) > 0).all()


def test_axis_rule_conv_heads_and_sequential_successor() -> None:
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.Sigmoid(),
    )
    plans = plan_units(m, list(m.named_modules()))
    assert plans["0"].dim == 1 and plans["0"].nonlinearity is None  # BN follows, not ReLU
    assert plans["1"].dim == 1 and plans["1"].nonlinearity == "relu" and plans["1"].pre_activation
    assert plans["2"].dim == 1 and plans["2"].nonlinearity == "relu"  # inherits from BN
    assert "3" not in plans  # Flatten: no rule
    assert plans["4"].dim == -1 and plans["4"].nonlinearity == "sigmoid"
    assert plans["5"].dim == -1 and not plans["5"].pre_activation
    mha = nn.MultiheadAttention(8, 2)
    assert plan_units(mha, [("", mha)])[""].heads == 2


def test_conv_and_attention_heads_in_a_trace(tmp_path: Path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.attn = nn.MultiheadAttention(8, 4, batch_first=True)

        def forward(self, img: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
            return self.conv(img).mean() + self.attn(seq, seq, seq)[0].mean()

    torch.manual_seed(0)
    net = Net()
    img, seq = torch.randn(2, 2, 5, 5), torch.randn(2, 6, 8)
    with torch.no_grad():
        conv_out = net.conv(img)
        attn_out = net.attn(seq, seq, seq)[0]
    path = tmp_path / "t.arrow"
    with dnntrace.enable(net, path, host_buffers=64, units=True) as tr:
        net(img, seq).backward()
        tr.step()
    np.testing.assert_allclose(
        _vectors(path, "unit_mean", "conv")[0], conv_out.mean((0, 2, 3)).numpy(), rtol=1e-5
    )
    heads = attn_out.unflatten(-1, (4, 2))
    np.testing.assert_allclose(
        _vectors(path, "unit_max", "attn")[0], heads.amax((0, 1, 3)).numpy(), rtol=1e-6
    )


def test_topk_keeps_the_largest_inputs_with_their_ids(tmp_path: Path) -> None:
    m = nn.Sequential(nn.Linear(3, 3))
    with torch.no_grad():
        m[0].weight.copy_(torch.eye(3))
        m[0].bias.zero_()
    ext = UnitStats(topk=2, topk_every=100, gradients=False, every=1)
    path = tmp_path / "t.arrow"
    batches = [torch.tensor([[1.0, 9.0, 0.0], [5.0, 2.0, 0.5]]), torch.tensor([[7.0, 1.0, 0.25]])]
    with dnntrace.enable(m, path, host_buffers=64, extensions=[ext]) as tr:
        for i, x in enumerate(batches):
            ext.set_sample_ids(torch.arange(len(x)) + 100 * (i + 1))
            m(x)
            tr.step()
    t = dnntrace.load(path)
    last = {}
    for kind in ("unit_topk_value", "unit_topk_index", "unit_topk_step"):
        rows = t.select(kind=kind, module="0")
        last[kind] = np.asarray(rows.column("values").to_pylist()[-1]).reshape(3, 2)
    np.testing.assert_array_equal(last["unit_topk_value"], [[7, 5], [9, 2], [0.5, 0.25]])
    np.testing.assert_array_equal(last["unit_topk_index"], [[200, 101], [100, 101], [101, 200]])
    np.testing.assert_array_equal(last["unit_topk_step"], [[1, 0], [0, 0], [0, 1]])


def test_eval_forwards_and_unsampled_steps_are_skipped(tmp_path: Path) -> None:
    m = nn.Sequential(nn.Linear(3, 4))
    path = tmp_path / "t.arrow"
    with dnntrace.enable(m, path, host_buffers=64, units={"every": 2}) as tr:
        for _ in range(4):
            m(torch.randn(2, 3)).sum().backward()
            with torch.no_grad():
                m(torch.randn(2, 3))
            tr.step()
    assert sorted(_vectors(path, "unit_mean", "0")) == [0, 2]


@pytest.mark.parametrize("every", [1, 3])
def test_default_cadence_is_every_tenth_traced_step(tmp_path: Path, every: int) -> None:
    m = nn.Sequential(nn.Linear(3, 4))
    path = tmp_path / "t.arrow"
    with dnntrace.enable(m, path, host_buffers=64, units=True, every=every) as tr:
        for _ in range(25 * every):
            m(torch.randn(2, 3)).sum().backward()
            tr.step()
    want = [s * every for s in (0, 10, 20)]
    assert sorted(_vectors(path, "unit_mean", "0")) == want
    assert sorted(_vectors(path, "unit_grad_rms", "0")) == want


@pytest.mark.parametrize("units", [{"modules": ["nothing*"]}, {"topk": 0, "attribution": False}])
def test_options(tmp_path: Path, units: dict) -> None:
    m = nn.Sequential(nn.Linear(3, 4))
    path = tmp_path / "t.arrow"
    with dnntrace.enable(m, path, host_buffers=64, units=units) as tr:
        m(torch.randn(2, 3)).sum().backward()
        tr.step()
    kinds = set(dnntrace.load(path).kinds)
    if "modules" in units:
        assert not any(k.startswith("unit_") for k in kinds)
    else:
        assert "unit_grad_rms" in kinds and "unit_attr" not in kinds
        assert "unit_topk_value" not in kinds


def test_uncompressed_traces_for_large_unit_maps(tmp_path: Path) -> None:
    m = nn.Sequential(nn.Linear(64, 256))
    sizes = {}
    for comp in ("zstd", None):
        path = tmp_path / f"{comp}.arrow"
        torch.manual_seed(0)
        with dnntrace.enable(m, path, units={"every": 1}, compression=comp) as tr:
            for _ in range(3):
                m(torch.randn(8, 64)).sum().backward()
                tr.step()
        sizes[comp] = path.stat().st_size
        assert sorted(_vectors(path, "unit_mean", "0")) == [0, 1, 2]
    assert sizes[None] > sizes["zstd"]
    with pytest.raises(ValueError, match="compression must be"):
        dnntrace.enable(m, tmp_path / "bad.arrow", compression="gzip")
