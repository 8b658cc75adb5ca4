"""enable / disable / close, hooks removed, torch.compile, torch.ops.dnntrace.enable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.optim.optimizer as om
from _capture_support import MLP, TinyTransformer, load_rows, mlp_batch, tf_batch, train

import dnntrace
from dnntrace.capture.tracer import Tracer


def _hook_sizes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "global_pre": len(om._global_optimizer_pre_hooks),
        "global_post": len(om._global_optimizer_post_hooks),
        "opt_pre": len(opt._optimizer_step_pre_hooks),
        "opt_post": len(opt._optimizer_step_post_hooks),
        "forward": sum(len(m._forward_hooks) for m in model.modules()),
        "grad_acc": sum(len(p._post_accumulate_grad_hooks or {}) for p in params),
        "tensor": sum(len(p._backward_hooks or {}) for p in params),
    }


@pytest.mark.parametrize("explicit_optimizer", [True, False], ids=["optimizer=", "found"])
def test_context_manager_removes_every_hook(explicit_optimizer: bool, trace_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = _hook_sizes(model, opt)
    opts = {"optimizer": opt} if explicit_optimizer else {}
    with dnntrace.enable(model, trace_path, **opts) as tr:
        assert isinstance(tr, Tracer)
        during = _hook_sizes(model, opt)
        assert during["forward"] > before["forward"]
        train(model, opt, mlp_batch, 2)
    assert tr.closed
    assert _hook_sizes(model, opt) == before
    assert dnntrace.load(trace_path).steps.tolist() == [0, 1]
    # the model trains on, untraced, and can be traced again
    train(model, opt, mlp_batch, 1)
    assert dnntrace.load(trace_path).steps.tolist() == [0, 1]
    with dnntrace.enable(model, trace_path.with_name("again.arrow")):
        train(model, opt, mlp_batch, 1)
    assert _hook_sizes(model, opt) == before


def test_context_manager_closes_when_the_step_raises(trace_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = _hook_sizes(model, opt)
    with pytest.raises(RuntimeError, match="shape"), dnntrace.enable(model, trace_path) as tr:
        train(model, opt, mlp_batch, 1)
        model(torch.zeros(2, 99))  # a user error inside the traced block
    assert tr.closed and _hook_sizes(model, opt) == before
    assert dnntrace.load(trace_path).steps.tolist() == [0]


def test_enable_twice_raises_then_disable(tmp_path: Path) -> None:
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tr = dnntrace.enable(model, tmp_path / "a.arrow")
    with pytest.raises(RuntimeError, match="already traced into .*a.arrow"):
        dnntrace.enable(model, tmp_path / "b.arrow")
    train(model, opt, mlp_batch, 2)
    stats = dnntrace.disable(model)
    assert stats is not None and stats["steps_written"] == 2 and stats["steps_dropped"] == 0
    assert tr.closed
    assert dnntrace.disable(model) is None
    assert tr.close() == stats  # idempotent
    with dnntrace.enable(model, tmp_path / "b.arrow"):
        pass


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    model = MLP()
    with pytest.raises(TypeError, match="nn.Module"):
        dnntrace.enable(object(), tmp_path / "x.arrow")  # type: ignore[arg-type]
    for bad in ({"every": 0}, {"every": 1.5}, {"activations_every": 0}, {"k": 99}):
        with pytest.raises(ValueError):
            dnntrace.enable(model, tmp_path / "x.arrow", **bad)
    # a refused enable leaves nothing behind: the model can be traced
    assert not any(m._forward_hooks for m in model.modules())
    with dnntrace.enable(model, tmp_path / "ok.arrow"):
        pass


def test_foreign_optimizer_is_refused_cleanly(tmp_path: Path) -> None:
    import gc
    import threading

    model = MLP()
    other = torch.optim.SGD(MLP().parameters(), lr=0.1)
    writers = sum(t.name == "dnntrace-writer" for t in threading.enumerate())
    with pytest.raises(ValueError, match="none of the model's parameters"):
        dnntrace.enable(model, tmp_path / "x.arrow", optimizer=other)
    gc.collect()
    assert not any(m._forward_hooks for m in model.modules())
    assert sum(t.name == "dnntrace-writer" for t in threading.enumerate()) == writers
    assert not (tmp_path / "x.arrow").exists()


def test_torch_ops_enable_after_import_torch_dnntrace(tmp_path: Path) -> None:
    path = tmp_path / "ops.arrow"
    code = textwrap.dedent(
        f"""
        import torch, dnntrace
        m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        tr = torch.ops.dnntrace.enable(m, {str(path)!r}, every=1)
        for _ in range(2):
            opt.zero_grad(); m(torch.randn(5, 4)).sum().backward(); opt.step()
        stats = torch.ops.dnntrace.disable(m)
        assert stats["steps_written"] == 2, stats
        assert not any(mod._forward_hooks for mod in m.modules())
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    assert dnntrace.load(path).steps.tolist() == [0, 1]


def test_compiled_model_traces_the_original(trace_path: Path) -> None:
    model = MLP()
    compiled = torch.compile(model, backend="eager")
    with dnntrace.enable(compiled, trace_path) as tr:
        assert tr.model is model  # its hooks run inside the compiled graph (test_compile.py)
        for m in (model, compiled):
            with pytest.raises(RuntimeError, match="already traced"):
                dnntrace.enable(m, trace_path.with_suffix(".b.arrow"))
    assert dnntrace.disable(compiled) is None  # closed already


# torch's dynamo reads .grad of non-leaf tensors in tuple outputs (MultiheadAttention) under its
# own warning filter (torch._dynamo.variables.builder.safe_has_grad), which pytest's "error" beats
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.filterwarnings("ignore:dnntrace. the model runs under torch.compile:RuntimeWarning")
def test_enable_then_compile_records_weights_and_grads(trace_path: Path) -> None:
    # backend="aot_eager": the full dynamo + AOTAutograd path without needing a C compiler
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with dnntrace.enable(model, trace_path, optimizer=opt) as tr:
        compiled = torch.compile(model, backend="aot_eager")
        losses = train(compiled, opt, tf_batch, 3)
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert tr.stats()["disabled"] is None
    df = load_rows(trace_path)
    assert sorted(set(df["step"])) == [0, 1, 2]
    n_params = len(list(model.parameters()))
    for kind in ("weight", "weight_grad"):
        per_step = df[df["kind"] == kind].groupby("step").size()
        assert (per_step == n_params).all(), kind
    row = df[(df["kind"] == "weight") & (df["module"] == "head") & (df["tensor"] == "weight")]
    final = model.head.weight.detach().double()
    assert row[row["step"] == 2]["max"].item() == final.max().item()
    torch._dynamo.reset()
