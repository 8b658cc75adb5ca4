"""weight_grad rows against the gradient each optimizer really stepped with, for every way a step
runs: plain, step(closure) (SGD, Adam, LBFGS), accumulation, GradScaler with skipped steps,
clipping, zero_grad(set_to_none=False), several optimizers; and where log_scalar rows land.

The truth is captured by the test itself, in float64, at the point the optimizer consumes the
gradient (inside the closure, after clipping, after unscale_); for SGD it is also checked against
the update itself, (w_before - w_after) / lr."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from _capture_support import MLP, assert_row_matches, load_rows, mlp_batch, one_row
from torch import nn

import dnntrace

Truth = dict[int, dict[tuple[str, str], torch.Tensor]]


def _grads(model: nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    out = {}
    for mn, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            if p.grad is not None:
                out[(mn, pn)] = p.grad.detach().double().clone()
    return out


def _weights(model: nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    return {
        (mn, pn): p.detach().double().clone()
        for mn, m in model.named_modules()
        for pn, p in m.named_parameters(recurse=False)
    }


def _check_grads(df: pd.DataFrame, truth: Truth) -> None:
    wg = df[(df["kind"] == "weight_grad") & (df["phase"] == "train")]
    assert sorted(set(wg["step"])) == sorted(truth), "one weight_grad step per optimizer step"
    for step, grads in truth.items():
        got = wg[wg["step"] == step]
        assert len(got) == len(grads), f"step {step}"
        for (mn, pn), g in grads.items():
            assert_row_matches(one_row(got, module=mn, tensor=pn), g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _closure_loop(
    opt_of: Callable[[nn.Module], torch.optim.Optimizer], path: Path, steps: int = 4
) -> tuple[Truth, list[int], pd.DataFrame, list[Any]]:
    torch.manual_seed(0)
    model = MLP()
    opt = opt_of(model)
    g = torch.Generator().manual_seed(1)
    truth: Truth = {}
    evals: list[int] = []
    losses: list[Any] = []
    with dnntrace.enable(model, path, activations_every=1) as tr:
        for step in range(steps):
            x, y = mlp_batch(g)
            n = [0]

            def closure(
                x: torch.Tensor = x, y: torch.Tensor = y, n: list[int] = n, step: int = step
            ) -> Any:
                opt.zero_grad()
                loss = _loss(model, x, y)
                loss.backward()
                if n[0] == 0:  # the evaluation the trace records: the first
                    truth[step] = _grads(model)
                n[0] += 1
                return loss

            loss = opt.step(closure)
            tr.log_scalar("loss", loss)
            losses.append(float(loss.detach()))
            evals.append(n[0])
    return truth, evals, load_rows(path), losses


@pytest.mark.parametrize("name", ["sgd", "adam", "lbfgs"])
def test_step_with_closure_records_that_steps_gradient(name: str, trace_path: Path) -> None:
    opt_of = {
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
        "lbfgs": lambda m: torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=4),
    }[name]
    truth, evals, df, losses = _closure_loop(opt_of, trace_path)
    _check_grads(df, truth)
    if name == "lbfgs":
        assert max(evals) > 1  # the line search really evaluated several times
    # one forward per step is recorded (LBFGS's later evaluations are not)
    act = df[(df["kind"] == "activation") & (df["module"] == "0")]
    assert list(act["step"]) == [0, 1, 2, 3] and set(act["calls"]) == {1}
    loss = df[(df["kind"] == "scalar") & (df["tensor"] == "loss")]
    assert list(loss["step"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(loss["sum"], losses)
    assert sorted(set(df["step"])) == [0, 1, 2, 3]  # no trailing step


def test_sgd_closure_gradient_is_the_update(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(2)
    deltas: Truth = {}
    with dnntrace.enable(model, trace_path):
        for step in range(3):
            x, y = mlp_batch(g)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = _loss(model, x, y)
                loss.backward()
                return loss

            w0 = _weights(model)
            opt.step(closure)
            w1 = _weights(model)
            deltas[step] = {k: (w0[k] - w1[k]) / 0.5 for k in w0}
    df = load_rows(trace_path)
    for step, d in deltas.items():
        for (mn, pn), want in d.items():
            row = one_row(df, step=step, module=mn, kind="weight_grad", tensor=pn)
            np.testing.assert_allclose(row["sum"], want.sum().item(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(row["sumsq"], want.square().sum().item(), rtol=1e-4)


@pytest.mark.parametrize("closure", [False, True])
def test_gradient_accumulation(closure: bool, trace_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    truth: Truth = {}
    with dnntrace.enable(model, trace_path):
        for step in range(3):
            opt.zero_grad()
            for _ in range(2):  # micro-batches outside the step
                x, y = mlp_batch(g)
                (_loss(model, x, y) / 3).backward()
            x, y = mlp_batch(g)
            if closure:  # the last micro-batch inside step(closure), as Lightning does

                def last(
                    x: torch.Tensor = x, y: torch.Tensor = y, step: int = step
                ) -> torch.Tensor:
                    loss = _loss(model, x, y) / 3
                    loss.backward()
                    truth[step] = _grads(model)
                    return loss

                opt.step(last)
            else:
                (_loss(model, x, y) / 3).backward()
                truth[step] = _grads(model)
                opt.step()
    df = load_rows(trace_path)
    _check_grads(df, truth)
    assert set(df[df["kind"] == "activation"]["calls"]) == {3}


def test_clipping_records_the_clipped_gradient(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(4)
    truth: Truth = {}
    raw: Truth = {}
    with dnntrace.enable(model, trace_path):
        for step in range(3):
            opt.zero_grad()
            x, y = mlp_batch(g)
            _loss(model, x, y).backward()
            raw[step] = _grads(model)
            nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            truth[step] = _grads(model)
            opt.step()
    df = load_rows(trace_path)
    _check_grads(df, truth)
    assert not torch.equal(raw[0][("0", "weight")], truth[0][("0", "weight")])  # clipping bit


def test_zero_grad_keeping_tensors(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    truth: Truth = {}
    with dnntrace.enable(model, trace_path):
        for step in range(3):
            opt.zero_grad(set_to_none=False)
            x, y = mlp_batch(g)
            if step == 1:  # the head alone: the rest keeps its zero-filled gradients
                model[4](torch.randn(16, 32, generator=g)).sum().backward()
            else:
                _loss(model, x, y).backward()
            truth[step] = _grads(model)
            opt.step()
    df = load_rows(trace_path)
    _check_grads(df, truth)
    z = one_row(df, step=1, module="0", kind="weight_grad", tensor="weight")
    assert z["zero_count"] == z["count"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_scaler_marks_skipped_steps(dtype: torch.dtype, trace_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = torch.Generator().manual_seed(6)
    truth: Truth = {}
    before: dict[int, dict[tuple[str, str], torch.Tensor]] = {}
    after: dict[int, dict[tuple[str, str], torch.Tensor]] = {}
    scales = []
    with dnntrace.enable(model, trace_path) as tr:
        for step in range(4):
            opt.zero_grad()
            x, y = mlp_batch(g)
            if step == 2:
                x[0, 0] = float("inf")  # Inf gradients: the scaler skips this step
            with torch.autocast("cpu", dtype=dtype):  # CPU autocast: bf16 and fp16 in 2.13
                loss = _loss(model, x, y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            truth[step] = _grads(model)
            scales.append(scaler.get_scale())
            before[step] = _weights(model)
            scaler.step(opt)
            scaler.update()
            after[step] = _weights(model)
            tr.log_scalar("loss", loss)
    df = load_rows(trace_path)
    assert all(torch.equal(before[2][k], after[2][k]) for k in before[2])  # really skipped
    assert not torch.equal(before[1][("0", "weight")], after[1][("0", "weight")])
    _check_grads(df, truth)
    sk = df[(df["kind"] == "scalar") & (df["tensor"] == "amp/skipped")]
    assert list(sk["step"]) == [2] and list(sk["sum"]) == [1.0]
    sc = df[(df["kind"] == "scalar") & (df["tensor"] == "amp/scale")].sort_values("step")
    assert list(sc["sum"]) == scales
    assert sorted(set(df["step"])) == [0, 1, 2, 3]
    w2 = one_row(df, step=2, module="0", kind="weight_grad", tensor="weight")
    assert w2["nan_count"] + w2["posinf_count"] + w2["neginf_count"] > 0
    for step in range(4):  # weights: the values after the (possibly skipped) step
        assert_row_matches(
            one_row(df, step=step, module="0", kind="weight", tensor="weight"),
            after[step][("0", "weight")],
        )
    lo = df[(df["kind"] == "scalar") & (df["tensor"] == "loss")]
    assert list(lo["step"]) == [0, 1, 2, 3]


def test_several_optimizers_one_step_per_iteration(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    body = [p for n, p in model.named_parameters() if not n.startswith("4.")]
    o1 = torch.optim.SGD(body, lr=0.1)
    o2 = torch.optim.Adam(model[4].parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(7)
    truth: Truth = {}
    weights: Truth = {}
    with dnntrace.enable(model, trace_path) as tr:
        for step in range(3):
            o1.zero_grad()
            o2.zero_grad()
            x, y = mlp_batch(g)
            loss = _loss(model, x, y)
            loss.backward()
            truth[step] = _grads(model)
            o1.step()
            o2.step()
            weights[step] = _weights(model)
            tr.log_scalar("loss", loss)
    df = load_rows(trace_path)
    _check_grads(df, truth)
    for step, w in weights.items():  # after both updates
        for (mn, pn), want in w.items():
            assert_row_matches(one_row(df, step=step, module=mn, kind="weight", tensor=pn), want)
    lr = df[df["kind"] == "scalar"].groupby("tensor")["step"].apply(list).to_dict()
    assert lr == {"lr": [0, 1, 2], "lr/opt1": [0, 1, 2], "loss": [0, 1, 2]}


def test_without_optimizer_tracer_step_records_accumulated_gradient(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    g = torch.Generator().manual_seed(8)
    truth: Truth = {}
    with dnntrace.enable(model, trace_path) as tr:
        for step in range(3):
            model.zero_grad()
            for _ in range(2):
                x, y = mlp_batch(g)
                _loss(model, x, y).backward()
            truth[step] = _grads(model)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            tr.step()
    _check_grads(load_rows(trace_path), truth)


def test_gradients_cleared_before_tracer_step_warn(trace_path: Path) -> None:
    model = MLP()
    with dnntrace.enable(model, trace_path) as tr:
        x, y = mlp_batch(torch.Generator().manual_seed(0))
        _loss(model, x, y).backward()
        model.zero_grad()
        with pytest.warns(RuntimeWarning, match="cleared before tracer.step"):
            tr.step()


def test_log_scalar_steps(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(9)
    with dnntrace.enable(model, trace_path) as tr:
        tr.log_scalar("before", 1.0)  # step 0, before anything ran
        for step in range(3):
            x, y = mlp_batch(g)
            loss = _loss(model, x, y)
            tr.log_scalar("mid", float(step))  # between forward and step: this step
            opt.zero_grad()
            loss.backward()
            opt.step()
            tr.log_scalar("after", float(step))  # after the step, before the next forward
            tr.log_scalar("explicit", float(step), step=step)
            tr.log_scalar("next", float(step + 1), step=step + 1)
            with pytest.raises(ValueError, match="already written"):
                tr.log_scalar("old", 0.0, step=step - 1)
        with pytest.raises(ValueError, match="non-empty"):
            tr.log_scalar("", 1.0)
        with pytest.raises(TypeError, match="must be an int"):
            tr.log_scalar("x", 1.0, step=1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="number or tensor"):
            tr.log_scalar("x", "1")  # type: ignore[arg-type]
    df = load_rows(trace_path)
    sc = df[df["kind"] == "scalar"]
    by = {n: (list(s["step"]), list(s["sum"])) for n, s in sc.groupby("tensor")}
    assert by["before"] == ([0], [1.0])
    for n in ("mid", "after", "explicit"):
        assert by[n] == ([0, 1, 2], [0.0, 1.0, 2.0]), n
    # the step after the last is written too: a scalar was logged for it
    assert by["next"] == ([1, 2, 3], [1.0, 2.0, 3.0])
    assert sorted(set(df["step"])) == [0, 1, 2, 3]
