"""On CUDA: no host synchronisation in the traced hot path, and rows agree with the CPU."""

from __future__ import annotations

import copy
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


def test_traced_steps_do_not_sync(trace_path: Path) -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = TinyTransformer().to(dev)
    # foreach=True, capturable: the optimizer itself does not sync either
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True, capturable=True)
    g = torch.Generator().manual_seed(0)
    data = [tuple(t.to(dev) for t in tf_batch(g)) for _ in range(8)]
    with dnntrace.enable(model, trace_path, optimizer=opt) as tr:
        for x, y in data[:3]:  # warm-up: slots, banks, pinned buffers are allocated here
            loss = _step(model, opt, x, y)
            tr.log_scalar("loss", loss)
        torch.cuda.synchronize()
        old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x, y in data[3:]:
                loss = _step(model, opt, x, y)
                tr.log_scalar("loss", loss)
        finally:
            torch.cuda.set_sync_debug_mode(old)
    stats = tr.stats()
    assert stats["disabled"] is None
    assert stats["steps_written"] + stats["steps_dropped"] == 8
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
        assert (a[col] == b[col]).all(), col
    for col in ("min", "max", "sumsq"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-9, err_msg=col)
    tol = 1e-9 * np.sqrt(a["count"] * a["sumsq"]) + 1e-12
    assert (np.abs(a["sum"] - b["sum"]) <= tol).all()
