"""Trace rows against plain-torch references: activations, their gradients, weights, gradients."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from _capture_support import (
    MLP,
    Recorder,
    SmallCNN,
    TinyTransformer,
    assert_quantiles_close,
    assert_row_matches,
    cnn_batch,
    load_rows,
    mlp_batch,
    one_row,
    tf_batch,
    train,
)
from torch import nn

import dnntrace

MODELS = {
    "mlp": (MLP, mlp_batch),
    "cnn": (SmallCNN, cnn_batch),
    "transformer": (TinyTransformer, tf_batch),
}


def _traced_modules(path: Path) -> list[str]:
    meta = dnntrace.load(path).metadata
    return [m["name"] for m in meta["modules"] if m["traced"]]


# Without optimizer= the tracer summarises gradients with post-accumulate-grad hooks until it sees
# the optimizer's first step; then it clears those rows and summarises the final gradients once.
FOUND_OPTIMIZER = pytest.param(
    False,
    id="found",
)
OPTIMIZER_MODES = [pytest.param(True, id="optimizer="), FOUND_OPTIMIZER]


@pytest.mark.parametrize("explicit_optimizer", OPTIMIZER_MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_rows_match_reference(name: str, explicit_optimizer: bool, trace_path: Path) -> None:
    torch.manual_seed(0)
    make, batch = MODELS[name]
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = 3
    opts = {"optimizer": opt} if explicit_optimizer else {}
    with dnntrace.enable(model, trace_path, activations_every=1, **opts) as tr:
        modules = [n for n, _ in tr._modules]
        rec = Recorder(model, opt, modules)
        train(model, opt, batch, steps)
        rec.close()
    df = load_rows(trace_path)
    assert sorted(set(df["step"])) == list(range(steps))
    # one row per (step, phase, module, kind, tensor)
    key = ["step", "phase", "module", "kind", "tensor"]
    assert not df.duplicated(key).any()
    assert set(df["kind"]) == {
        "activation", "activation_grad", "weight", "weight_grad", "scalar", "exec_order"
    }  # fmt: skip
    order = df[df["kind"] == "exec_order"]  # first calls, at the first step
    assert list(order["step"]) == [0] and list(order["module"]) == [""]
    for step in range(steps):
        at = df[df["step"] == step]
        assert set(at["phase"]) == {"train"}
        for (mod, pos), ts in rec.act[step].items():
            assert_row_matches(one_row(at, module=mod, kind="activation", tensor=pos), ts)
        for (mod, pos), ts in rec.act_grad[step].items():
            assert_row_matches(one_row(at, module=mod, kind="activation_grad", tensor=pos), ts)
        n_act = len(rec.act[step]) + len(rec.act_grad[step])
        assert (at["kind"].str.startswith("activation")).sum() == n_act
        for (mod, pn), w in rec.weight[step].items():
            assert_row_matches(one_row(at, module=mod, kind="weight", tensor=pn), w)
        for (mod, pn), gr in rec.weight_grad[step].items():
            assert_row_matches(one_row(at, module=mod, kind="weight_grad", tensor=pn), gr)
        assert (at["kind"] == "weight").sum() == len(rec.weight[step])
        lr = one_row(at, kind="scalar", tensor="lr")
        assert lr["sum"] == pytest.approx(0.05)


@pytest.mark.parametrize("explicit_optimizer", OPTIMIZER_MODES)
def test_gradient_accumulation_row_is_accumulated_grad(
    explicit_optimizer: bool, trace_path: Path
) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opts = {"optimizer": opt} if explicit_optimizer else {}
    with dnntrace.enable(model, trace_path, activations_every=1, **opts) as tr:
        rec = Recorder(model, opt, [n for n, _ in tr._modules])
        train(model, opt, mlp_batch, 3, accumulate=4)
        rec.close()
    df = load_rows(trace_path)
    for step in range(3):
        at = df[df["step"] == step]
        for (mod, pn), gr in rec.weight_grad[step].items():
            assert_row_matches(one_row(at, module=mod, kind="weight_grad", tensor=pn), gr)
        # activations of the 4 micro-batches accumulate into one row per module
        row = one_row(at, module="0", kind="activation", tensor="")
        assert row["calls"] == 4
        assert_row_matches(row, rec.act[step][("0", "")])


def test_module_called_twice_accumulates(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dnntrace.enable(model, trace_path, activations_every=1):
        train(model, opt, cnn_batch, 2)
    df = load_rows(trace_path)
    for step in range(2):
        for kind in ("activation", "activation_grad"):
            row = one_row(df, step=step, module="act", kind=kind)
            assert row["calls"] == 2
            assert row["count"] == 2 * row["numel"]


@dataclasses.dataclass
class Pair:
    mean: torch.Tensor
    scale: torch.Tensor
    n: int = 3


class MultiOut(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        a = self.lin(x)
        b = torch.sigmoid(a)
        idx = torch.arange(3)  # an integer tensor: not traced
        if self.kind == "tuple":
            return a, (b, idx)
        if self.kind == "dict":
            return {"loc": a, "prob": b, "idx": idx}
        return Pair(a, b)


class Wrap(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.head = MultiOut(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x)
        if isinstance(out, tuple):
            a, (b, _) = out
        elif isinstance(out, dict):
            a, b = out["loc"], out["prob"]
        else:
            a, b = out.mean, out.scale
        return (a * b).sum(1)


@pytest.mark.parametrize(
    ("kind", "positions"),
    [("tuple", ["0", "1.0"]), ("dict", ["loc", "prob"]), ("dataclass", ["mean", "scale"])],
)
def test_structured_outputs_get_positions(
    kind: str, positions: list[str], trace_path: Path
) -> None:
    torch.manual_seed(0)
    model = Wrap(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dnntrace.enable(model, trace_path, modules=["head"]):
        rec = Recorder(model, opt, ["head"])
        x = torch.randn(5, 6)
        model(x).sum().backward()
        opt.step()
        rec.close()
    df = load_rows(trace_path)
    acts = df[(df["kind"] == "activation") & (df["module"] == "head")]
    assert sorted(acts["tensor"]) == sorted(positions)
    for pos in positions:
        assert_row_matches(one_row(acts, tensor=pos), rec.act[0][("head", pos)])
        grad = one_row(df, module="head", kind="activation_grad", tensor=pos)
        assert_row_matches(grad, rec.act_grad[0][("head", pos)])


def test_modules_globs_types_and_exclusions(tmp_path: Path) -> None:
    model = TinyTransformer()
    named = [n for n, _ in model.named_modules()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def traced(spec: object) -> set[str]:
        p = tmp_path / f"t{len(list(tmp_path.iterdir()))}.arrow"
        with dnntrace.enable(model, p, modules=spec):
            train(model, opt, tf_batch, 1)
        df = load_rows(p)
        return set(df[df["kind"] == "activation"]["module"])

    # MultiheadAttention uses out_proj's parameters without calling it: it has no output
    called = [n for n in named if n != "layer.self_attn.out_proj"]
    assert traced("layer.*") == {n for n in called if n.startswith("layer.")}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert traced(nn.Linear) == linears & set(called)
    assert traced(["head", nn.Embedding]) == {"head", "embed"}
    default = traced(None)
    assert "layer.linear1" in default and "" in default
    assert traced(["!layer.*"]) == {n for n in default if not n.startswith("layer.")}
    assert traced([nn.Linear, "!layer.*"]) == {"head"}
    with pytest.raises(TypeError, match="modules"):
        dnntrace.enable(model, tmp_path / "bad.arrow", modules=[3])


def test_every_and_activations_every(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    p = tmp_path / "every.arrow"
    with dnntrace.enable(model, p, every=3, activations_every=3):
        train(model, opt, mlp_batch, 8)
    df = load_rows(p)
    assert dnntrace.load(p).steps.tolist() == [0, 3, 6]
    for kind in ("activation", "activation_grad", "weight", "weight_grad"):
        assert sorted(set(df[df["kind"] == kind]["step"])) == [0, 3, 6], kind
    # untraced steps leave nothing behind (weight_grad of step 0: see FOUND_OPTIMIZER)
    assert (df[df["kind"] != "weight_grad"]["calls"] == 1).all()
    assert (df[df["step"] > 0]["calls"] == 1).all()

    p = tmp_path / "act_every.arrow"
    with dnntrace.enable(model, p, activations_every=2):
        train(model, opt, mlp_batch, 5)
    df = load_rows(p)
    for kind in ("activation", "activation_grad"):
        assert sorted(set(df[df["kind"] == kind]["step"])) == [0, 2, 4], kind
    for kind in ("weight", "weight_grad"):
        assert sorted(set(df[df["kind"] == kind]["step"])) == [0, 1, 2, 3, 4], kind


@pytest.mark.parametrize(("every", "steps", "act_steps"), [(1, 12, [0, 10]), (2, 22, [0, 20])])
def test_default_set_activations_every_tenth_recorded_step(
    every: int, steps: int, act_steps: list[int], tmp_path: Path
) -> None:
    """The default set: weights and weight gradients every ``every`` steps, activations and
    their gradients every ``10 * every`` steps; the resolved cadence is in the metadata."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    p = tmp_path / "default.arrow"
    with dnntrace.enable(model, p, every=every) as tr:
        assert tr.activations_every == 10 * every
        train(model, opt, mlp_batch, steps)
    df = load_rows(p)
    for kind in ("activation", "activation_grad"):
        assert sorted(set(df[df["kind"] == kind]["step"])) == act_steps, kind
    for kind in ("weight", "weight_grad"):
        assert sorted(set(df[df["kind"] == kind]["step"])) == list(range(0, steps, every)), kind
    opts = dnntrace.load(p).metadata["options"]
    assert opts["every"] == every and opts["activations_every"] == 10 * every
    assert (df[df["kind"].str.startswith("activation")]["calls"] == 1).all()


def test_eval_rows_are_tagged(trace_path: Path) -> None:
    """The phase follows gradient flow: no_grad passes are eval; an eval-mode pass with autograd
    on (frozen BatchNorm while fine-tuning) is train."""
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    with dnntrace.enable(model, trace_path, activations_every=1):
        train(model, opt, cnn_batch, 1)
        with torch.no_grad():  # validation under no_grad, model still in train mode
            x_nograd = cnn_batch(g, n=3)[0]
            ref_nograd = nn.functional.conv2d(x_nograd, model.conv1.weight, model.conv1.bias, 1, 1)
            model(x_nograd)
        model.eval()
        with torch.inference_mode():
            x_inf = cnn_batch(g, n=2)[0]
            ref_inf = nn.functional.conv2d(x_inf, model.conv1.weight, model.conv1.bias, 1, 1)
            model(x_inf)
        x_eval = cnn_batch(g, n=2)[0]  # eval mode with autograd on: gradients flow
        ref_eval = nn.functional.conv2d(x_eval, model.conv1.weight, model.conv1.bias, 1, 1)
        model(x_eval).sum().backward()
        opt.zero_grad()
        model.train()
        x_tr = cnn_batch(g, n=4)[0]
        ref_tr = nn.functional.conv2d(x_tr, model.conv1.weight, model.conv1.bias, 1, 1)
        loss = nn.functional.cross_entropy(model(x_tr), torch.zeros(4, dtype=torch.long))
        loss.backward()
        opt.step()
    df = load_rows(trace_path)
    ev = df[df["phase"] == "eval"]
    assert set(ev["kind"]) == {"activation"}  # no gradients flow in eval
    assert set(ev["step"]) == {1}
    row = one_row(ev, module="conv1", kind="activation")
    assert_row_matches(row, [ref_nograd, ref_inf])
    tr1 = one_row(df, step=1, phase="train", module="conv1", kind="activation")
    assert_row_matches(tr1, [ref_eval, ref_tr])
    bn = one_row(df, step=1, phase="train", module="bn1", kind="activation_grad")
    assert bn["calls"] == 2  # the eval-mode BatchNorm passed gradients: train


def test_bf16_autocast_and_fp16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    p = tmp_path / "bf16.arrow"
    with dnntrace.enable(model, p, activations_every=1) as tr:
        rec = Recorder(model, opt, [n for n, _ in tr._modules])
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            x, y = mlp_batch(g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = nn.functional.cross_entropy(out.float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rec.close()
    df = load_rows(p)
    lin = one_row(df, step=1, module="0", kind="activation")
    assert lin["dtype"] == "bfloat16"
    assert one_row(df, step=1, module="0", kind="weight", tensor="weight")["dtype"] == "float32"
    for (mod, pos), ts in rec.act[1].items():
        assert_row_matches(one_row(df, step=1, module=mod, kind="activation", tensor=pos), ts)

    model = MLP().half()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    p = tmp_path / "fp16.arrow"
    with dnntrace.enable(model, p, activations_every=1) as tr:
        rec = Recorder(model, opt, [n for n, _ in tr._modules])
        train(model, opt, lambda g: (mlp_batch(g)[0].half(), mlp_batch(g)[1]), 2)
        rec.close()
    df = load_rows(p)
    assert set(df[~df["kind"].isin(["scalar", "exec_order"])]["dtype"]) == {"float16"}
    for (mod, pn), w in rec.weight[1].items():
        assert_row_matches(one_row(df, step=1, module=mod, kind="weight", tensor=pn), w)
    for (mod, pos), ts in rec.act_grad[1].items():
        row = one_row(df, step=1, module=mod, kind="activation_grad", tensor=pos)
        assert_row_matches(row, ts)


def test_channels_last_matches_contiguous(tmp_path: Path) -> None:
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    stats = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = SmallCNN().to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        p = tmp_path / f"{fmt}.arrow".replace("torch.", "")
        with dnntrace.enable(model, p, optimizer=opt) as tr:
            rec = Recorder(model, opt, [n for n, _ in tr._modules])
            ce_loss = nn.functional.cross_entropy(model(x.to(memory_format=fmt)), torch.arange(4))
            ce_loss.backward()
            opt.step()
            rec.close()
        if fmt is torch.channels_last:
            assert rec.act[0][("conv1", "")][0].is_contiguous(memory_format=torch.channels_last)
        df = load_rows(p)
        for (mod, pos), ts in rec.act[0].items():
            assert_row_matches(one_row(df, module=mod, kind="activation", tensor=pos), ts)
        stats[fmt] = df.set_index(["module", "kind", "tensor"]).sort_index()
    a, b = stats[torch.contiguous_format], stats[torch.channels_last]
    assert list(a.index) == list(b.index)
    for col in ("count", "nan_count", "calls", "numel"):
        assert (a[col] == b[col]).all(), col
    # conv1's bias gradient is 0 up to rounding (BatchNorm follows): exact zeros may differ there
    acts = a.index.get_level_values("kind") == "activation"
    assert (a["zero_count"][acts] == b["zero_count"][acts]).all()
    # gradient sums cancel to ~1e-6 and differ in rounding: compare the activations' values
    # (BatchNorm's output sums to ~0: the tolerance scales with sqrt(count * sumsq))
    tol = 1e-5 * np.sqrt(a["count"][acts] * a["sumsq"][acts])
    assert (np.abs(a["sum"][acts] - b["sum"][acts]) <= tol).all()
    np.testing.assert_allclose(a["max"][acts], b["max"][acts], rtol=1e-5)
    np.testing.assert_allclose(a["min"][acts], b["min"][acts], rtol=1e-5)


def test_summary_and_quantiles_vs_numpy(trace_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dnntrace.enable(model, trace_path, activations_every=1) as tr:
        rec = Recorder(model, opt, [n for n, _ in tr._modules])
        train(model, opt, tf_batch, 3)
        rec.close()
    trace = dnntrace.load(trace_path)
    assert set(trace.modules) <= {n for n, _ in model.named_modules()}
    # modules in execution order: the leaves as our own forward hooks saw them fire first
    fired = list(dict.fromkeys(m for m, _ in rec.act[0]))
    leaves = [
        m for m in fired if not any(o.startswith(m + ".") or m == "" for o in fired if o != m)
    ]
    assert [m for m in trace.modules if m in set(leaves)] == leaves
    assert trace.modules[0] == "" or "" not in trace.modules  # the root before its children
    assert trace.steps.tolist() == [0, 1, 2]
    for mod in ("embed", "layer.linear1", "head"):
        x = rec.act[2][(mod, "")][0].double().numpy().ravel()
        s = trace.summary(mod, "activation", 2)
        assert s.count == x.size
        assert s.min == x.min() and s.max == x.max()
        assert_quantiles_close(s, x)
    w = rec.weight[1][("head", "weight")].double().numpy().ravel()
    assert_quantiles_close(trace.summary("head", "weight", 1, tensor="weight"), w)
    q = trace.quantiles("head", "weight", [0.1, 0.5, 0.9], tensor="weight")
    assert q.column("step").to_pylist() == [0, 1, 2]
    assert q.column_names == ["step", "q0.1", "q0.5", "q0.9"]
    want = np.quantile(w, 0.5, method="inverted_cdf")
    assert abs(q.column("q0.5")[1].as_py() - want) <= 2**-7 * abs(want)
