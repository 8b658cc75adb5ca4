"""On CUDA: no host synchronisation in the traced hot path, and rows agree with the CPU."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _capture_support import TinyTransformer, load_rows, tf_batch

import dnntrace

pytestmark = pytest.mark.needs_cuda


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize(
    "options",
    [{}, {"units": True}, {"on_anomaly": "record"}, {"units": True, "on_anomaly": "warn"}],
    ids=["default", "units", "anomaly", "units+anomaly"],
)
def test_traced_steps_do_not_sync(trace_path: Path, options: dict) -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = TinyTransformer().to(dev)
    # foreach=True, capturable: the optimizer itself does not sync either
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True, capturable=True)
    g = torch.Generator().manual_seed(0)
    data = [tuple(t.to(dev) for t in tf_batch(g)) for _ in range(8)]
    with dnntrace.enable(model, trace_path, optimizer=opt, **options) as tr:
        for x, y in data[:3]:  # warm-up: slots, banks, pinned buffers are allocated here
            loss = _step(model, opt, x, y)
            tr.log_scalar("loss", loss)
        torch.cuda.synchronize()
        old = torch.cuda.get_sync_debug_mode()
        try:
            with warnings.catch_warnings():  # "a prototype feature" (torch 2.11)
                warnings.simplefilter("ignore", UserWarning)
                torch.cuda.set_sync_debug_mode("error")
            for x, y in data[3:]:
                loss = _step(model, opt, x, y)
                tr.log_scalar("loss", loss)
        finally:
            torch.cuda.set_sync_debug_mode(old)
    stats = tr.stats()
    assert stats["disabled"] is None
    # 8 optimizer steps, plus the loss logged after the last one (it belongs to the next step,
    # which the close flushes)
    assert stats["steps_written"] + stats["steps_dropped"] == 9
    assert len(dnntrace.load(trace_path).steps) == stats["steps_written"]


def test_cuda_rows_match_cpu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cpu_model = TinyTransformer().double()  # float64: both devices compute the same values
    models = {"cpu": cpu_model, "cuda": copy.deepcopy(cpu_model).cuda()}
    g = torch.Generator().manual_seed(0)
    x, y = tf_batch(g)
    frames = {}
    for dev, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        p = tmp_path / f"{dev}.arrow"
        with dnntrace.enable(model, p, optimizer=opt):
            _step(model, opt, x.to(dev), y.to(dev))
        frames[dev] = load_rows(p).set_index(["module", "kind", "tensor"]).sort_index()
    a, b = frames["cpu"], frames["cuda"]
    assert list(a.index) == list(b.index)
    for col in ("count", "calls", "numel", "nan_count", "zero_count", "negative_count"):
        differ = a.index[(a[col] != b[col]).to_numpy()]
        assert not len(differ), (col, [(i, a.loc[i, col], b.loc[i, col]) for i in differ[:5]])
    for col in ("min", "max", "sumsq"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-9, err_msg=col)
    tol = 1e-9 * np.sqrt(a["count"] * a["sumsq"]) + 1e-12
    assert (np.abs(a["sum"] - b["sum"]) <= tol).all()


def test_cuda_unit_rows_match_cpu(tmp_path: Path) -> None:
    """Per-unit rows (native CUDA kernels) against the CPU kernels on a float64 model."""
    torch.manual_seed(0)
    cpu_model = TinyTransformer().double()
    models = {"cpu": cpu_model, "cuda": copy.deepcopy(cpu_model).cuda()}
    g = torch.Generator().manual_seed(0)
    batches = [tf_batch(g) for _ in range(3)]
    rows = {}
    for dev, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        p = tmp_path / f"{dev}.arrow"
        with dnntrace.enable(model, p, optimizer=opt, units=True):
            for x, y in batches:
                _step(model, opt, x.to(dev), y.to(dev))
        t = dnntrace.load(p).table.to_pandas()
        t = t[t["kind"].str.startswith("unit_")]
        rows[dev] = {(r.step, r.module, r.kind): np.asarray(r.values) for r in t.itertuples()}
    assert rows["cpu"].keys() == rows["cuda"].keys() and rows["cpu"]
    for key, a in rows["cpu"].items():
        b = rows["cuda"][key]
        if key[2] in ("unit_firing", "unit_saturated", "unit_max") or "topk" in key[2]:
            np.testing.assert_array_equal(a, b, err_msg=str(key))
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(key))
