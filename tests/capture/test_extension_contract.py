"""A third-party extension written only against the public contract (``dnntrace.Extension``,
``dnntrace.TraceContext``): it records rows in a real training loop, checked against what our
own code computes in float64, read back with ``dnntrace.load`` and by the viewer's ``RunStore``."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dnntrace
from dnntrace.capture.contract import TracingError

KIND = "grad_weight_ratio"  # a vector row: ||grad|| / ||weight|| of one parameter
SCALED = "grad_over_wnorm"  # a full summary row: grad / ||weight||, element-wise


class GradWeightRatio(dnntrace.Extension):
    """Per parameter ||grad|| / ||weight|| (before the update), every ``every``-th step: a
    vector row per parameter, one scalar per parameter (the viewer's scalar plot), and the
    summary (histogram, moments) of ``grad / ||weight||``. Uses only ``TraceContext``."""

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.steps_seen: list[int] = []

    def attach(self, tracer: dnntrace.TraceContext) -> None:
        self.params = [(m, n, p) for m, n, p in tracer.params if p.requires_grad]

    def before_optimizer_step(
        self, tracer: dnntrace.TraceContext, optimizer: torch.optim.Optimizer
    ) -> None:
        if not tracer.sampled(self.every):
            return
        have = [(m, n, p) for m, n, p in self.params if p.grad is not None]
        g = torch.stack([torch.linalg.vector_norm(p.grad) for _, _, p in have])
        w = torch.stack([torch.linalg.vector_norm(p.detach()) for _, _, p in have])
        ratio = g / w  # on the device: no sync
        tracer.record_vectors([(m, KIND, n) for m, n, _ in have], [1] * len(have), ratio)
        for i, (m, n, _) in enumerate(have):
            tracer.log_scalar(f"{KIND}/{m}.{n}", ratio[i])
        tracer.accumulate_many(
            [(m, SCALED, n) for m, n, _ in have],
            [p.grad / w[i] for i, (_, _, p) in enumerate(have)],
        )
        self.steps_seen.append(tracer.step_index)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _train(model: nn.Module, path: Path, steps: int, ext: dnntrace.Extension, **opts: object):
    """Trains ``steps`` steps; returns, per step, our own float64 reference taken right before
    ``opt.step()`` (the gradients the optimizer steps with, the weights before the update)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref: list[dict[tuple[str, str], tuple[float, np.ndarray]]] = []
    named = [
        (mn, pn, p)
        for mn, mod in model.named_modules()
        for pn, p in mod.named_parameters(recurse=False)
    ]
    with dnntrace.enable(model, path, extensions=[ext], **opts):
        for _ in range(steps):
            x = torch.randn(32, 8)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            step_ref = {}
            for mn, pn, p in named:
                g = p.grad.detach().double()
                wn = float(torch.linalg.vector_norm(p.detach().double()))
                step_ref[(mn, pn)] = (float(torch.linalg.vector_norm(g)) / wn, (g / wn).numpy())
            ref.append(step_ref)
            opt.step()
    return ref


def test_third_party_extension_rows_match_float64_reference(tmp_path: Path) -> None:
    path = tmp_path / "t.arrow"
    ext = GradWeightRatio()
    ref = _train(_model(), path, 5, ext)
    assert ext.steps_seen == [0, 1, 2, 3, 4]

    trace = dnntrace.load(path)
    rows = trace.select(kind=KIND).to_pandas()
    assert len(rows) == 5 * 4  # 4 parameters, 5 steps
    for r in rows.itertuples():
        want = ref[r.step][(str(r.module), str(r.tensor))][0]
        assert len(r.values) == 1
        assert r.values[0] == pytest.approx(want, rel=1e-5)

    for step, step_ref in enumerate(ref):
        for (mn, pn), (_, scaled) in step_ref.items():
            s = trace.summary(mn, SCALED, step, tensor=pn)
            assert s.count == scaled.size
            assert s.nan == 0
            assert s.min == pytest.approx(float(scaled.min()), rel=1e-6)
            assert s.max == pytest.approx(float(scaled.max()), rel=1e-6)
            tol = 1e-6 * float(np.abs(scaled).sum())
            assert s.mean * s.count == pytest.approx(float(scaled.sum()), abs=tol)
            # the histogram holds every element: its median lies between the two middle
            # elements, within the layout's relative accuracy (k=6: 0.78 %)
            q = s.quantile(0.5)
            lo = float(np.quantile(scaled, 0.5, method="lower"))
            hi = float(np.quantile(scaled, 0.5, method="higher"))
            assert lo - 0.01 * abs(lo) <= q <= hi + 0.01 * abs(hi)


def test_third_party_extension_rows_reach_the_viewer_store(tmp_path: Path) -> None:
    pytest.importorskip("panel")
    from dnntrace_viewer.data_store import Run, RunStore

    path = tmp_path / "t.arrow"
    ref = _train(_model(), path, 4, GradWeightRatio())
    store = RunStore(runs=[Run.open(str(path), use_cache=False)])
    run = store.current
    scalars = run.scalars()
    for step, step_ref in enumerate(ref):
        for (mn, pn), (want, _) in step_ref.items():
            got = scalars[(scalars["name"] == f"{KIND}/{mn}.{pn}") & (scalars["step"] == step)]
            assert len(got) == 1
            assert float(got["value"].iloc[0]) == pytest.approx(want, rel=1e-5)
    vec = run.trace.select(kind=KIND)
    assert vec.num_rows == 4 * 4
    # a derived row never raises the model's flags, and the model's rows are all still there
    assert set(run.stats()["kind"]) == {"activation", "activation_grad", "weight", "weight_grad"}


def test_extension_cadence_through_sampled(tmp_path: Path) -> None:
    ext = GradWeightRatio(every=2)
    _train(_model(), tmp_path / "t.arrow", 5, ext)
    assert ext.steps_seen == [0, 2, 4]
    steps = dnntrace.load(tmp_path / "t.arrow").select(kind=KIND).column("step").to_pylist()
    assert sorted(set(steps)) == [0, 2, 4]


def test_tracer_is_a_trace_context(tmp_path: Path) -> None:
    with dnntrace.enable(_model(), tmp_path / "t.arrow") as tr:
        assert isinstance(tr, dnntrace.TraceContext)
        assert tr.file_metadata()["options"]["every"] == 1
        assert tr.records("weight") and tr.records("activation_grad")


class _Broken(dnntrace.Extension):
    def on_step_end(self, tracer: dnntrace.TraceContext) -> None:
        raise RuntimeError("boom")


def test_failing_extension_disables_tracing_training_continues(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = dnntrace.enable(model, tmp_path / "t.arrow", extensions=[_Broken()])
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
        tr.close()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "tracing disabled" in msgs[0] and "boom" in msgs[0]
    assert tr.disabled_reason is not None


def test_failing_extension_raises_in_strict_mode(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tr = dnntrace.enable(model, tmp_path / "t.arrow", extensions=[_Broken()], strict=True)
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    with pytest.raises(TracingError, match="boom"):
        opt.step()
    tr.close()
