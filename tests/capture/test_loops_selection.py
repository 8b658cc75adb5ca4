"""Phases, checkpoint recompute, module selection and order, one tracer per path, and the
reading examples of docs/FORMAT.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _capture_support import MLP, assert_row_matches, load_rows, mlp_batch, one_row
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import dnntrace
from dnntrace.capture.selection import iter_float_tensors
from dnntrace.capture.tracer import _float_outputs

ROOT = Path(__file__).resolve().parents[2]


class Blocks(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reentrant is None:
            h = self.inner(x)
        else:
            h = checkpoint(self.inner, x, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_is_not_counted_twice(reentrant: bool, tmp_path: Path) -> None:
    rows = {}
    for mode in (None, reentrant):
        torch.manual_seed(0)
        model = Blocks(mode)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        path = tmp_path / f"{mode}.arrow"
        with dnntrace.enable(model, path):
            for _ in range(2):
                x = torch.randn(5, 6, generator=g, requires_grad=mode is True)
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
        rows[mode] = load_rows(path).set_index(["step", "module", "kind", "tensor", "phase"])
    plain, ck = rows[None], rows[reentrant]
    assert set(ck.index) == set(plain.index)  # all train, same rows
    for col in ("calls", "count", "nan_count", "zero_count", "min", "max"):
        assert (ck[col].sort_index() == plain[col].sort_index()).all(), col
    np.testing.assert_allclose(ck["sum"].sort_index(), plain["sum"].sort_index(), rtol=1e-6)


def test_summary_and_quantiles_default_to_train(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "t.arrow"
    with dnntrace.enable(model, path, activations_every=1):
        x, y = mlp_batch(g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            model(100 * mlp_batch(g)[0])  # validation: far larger activations
    t = dnntrace.load(path)
    s = t.summary("0", "activation")
    q = t.quantiles("0", "activation", (1.0,))
    assert s.max == pytest.approx(q.column("q1")[0].as_py(), rel=2**-7)
    assert s.count == t.summary("0", "activation", phase="train").count
    assert t.summary("0", "activation", phase=None).count == 2 * s.count


class Head(nn.Module):  # a parameter-free module with children: not a leaf, owns nothing
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x).log()  # NaN for negative inputs, made here, not in a child


def test_root_traced_and_noops_excluded(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.Identity(), nn.Dropout(0.5), Head())
    path = tmp_path / "t.arrow"
    with dnntrace.enable(model, path) as tr:
        traced = [n for n, _ in tr.traced_modules]
        out = model(torch.randn(8, 4))
        tr.step()
    assert traced == ["", "0", "3"]  # root; Linear; dropout that drops; not Identity/p=0/Head
    root = one_row(load_rows(path), module="", kind="activation")
    assert_row_matches(root, out)
    assert root["nan_count"] > 0
    rc = subprocess.run(
        [sys.executable, "-m", "dnntrace.cli", "info", str(path)], capture_output=True, text=True
    )
    assert rc.returncode == 0, rc.stderr
    assert "anomalies (first" in rc.stdout and "activation" in rc.stdout


def test_modules_by_class_name_and_type(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Identity(), nn.Dropout(0.0), nn.Tanh())
    cases = {
        "!ReLU": ["", "0", "4"],
        ("!Re*", "!Tanh"): ["", "0"],
        nn.Identity: ["2"],
        ("Identity", "Dropout"): ["2", "3"],
        "*": ["", "0", "1", "2", "3", "4"],
    }
    for i, (spec, want) in enumerate(cases.items()):
        with dnntrace.enable(model, tmp_path / f"{i}.arrow", modules=spec) as tr:
            assert [n for n, _ in tr.traced_modules] == want, spec
    with pytest.raises(ValueError, match="needs a glob"):
        dnntrace.enable(model, tmp_path / "x.arrow", modules="!")


def test_module_order_is_execution_order(tmp_path: Path) -> None:
    class Rev(nn.Module):  # defined head first, run head last
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x)))

    model = Rev()
    path = tmp_path / "t.arrow"
    with dnntrace.enable(model, path) as tr:
        model(torch.randn(2, 3)).sum().backward()
        tr.step()
    t = dnntrace.load(path)
    assert [m["name"] for m in t.module_tree] == ["", "head", "body"]
    # first call: the root's forward begins before its children's, a parent precedes its first
    # child, then the children as they were called (body before head, against definition order)
    assert t.modules == ["", "body", "head"]


def test_nan_scalar_is_reported_by_info(tmp_path: Path) -> None:
    model = MLP()
    path = tmp_path / "t.arrow"
    with dnntrace.enable(model, path) as tr:
        for s in range(3):
            tr.log_scalar("loss", float("nan") if s else 1.0)
            tr.step()
    rc = subprocess.run(
        [sys.executable, "-m", "dnntrace.cli", "info", str(path)], capture_output=True, text=True
    )
    assert rc.returncode == 0, rc.stderr
    assert "'loss' is not finite at 2 of its 3 steps, first at step 1" in rc.stdout
    assert "anomalies  none (no NaN" not in rc.stdout


def test_two_live_tracers_on_one_path_refused(tmp_path: Path) -> None:
    a, b = MLP(), MLP()
    path = tmp_path / "t.arrow"
    with dnntrace.enable(a, path) as tr:
        a(torch.randn(2, 12)).sum().backward()
        tr.step()
        with pytest.raises(RuntimeError, match="being written by another live tracer"):
            dnntrace.enable(b, tmp_path / "." / "t.arrow")
    assert len(load_rows(path)) > 0  # the first run's data is intact
    with dnntrace.enable(b, path):  # closed: the path is free again
        pass


def test_format_md_examples_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with dnntrace.enable(model, tmp_path / "trace.arrow") as tr:
        for _ in range(3):
            x, y = mlp_batch(g)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tr.log_scalar("loss", loss)
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    code = (
        "\n".join(blocks)
        + "\n"
        + (
            "assert len(df) == table.num_rows > 0\n"
            "assert grads.height == (df['kind'] == 'weight_grad').sum() > 0\n"
            "assert [r[0] for r in loss.fetchall()] == [0, 1, 2]\n"
        )
    )
    rc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert rc.returncode == 0, rc.stderr


_leaves = st.sampled_from(["f32", "i64", "none", "int", "param", "f16"])


def _build(spec: Any) -> Any:
    if isinstance(spec, str):
        return {
            "f32": lambda: torch.randn(2),
            "f16": lambda: torch.randn(2).half(),
            "i64": lambda: torch.arange(2),
            "none": lambda: None,
            "int": lambda: 3,
            "param": lambda: nn.Parameter(torch.randn(2)),
        }[spec]()
    kind, items = spec
    built = [_build(s) for s in items]
    if kind == "tuple":
        return tuple(built)
    if kind == "list":
        return built
    return {f"k{i}": v for i, v in enumerate(built)}


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        _leaves,
        lambda inner: st.tuples(
            st.sampled_from(["tuple", "list", "dict"]), st.lists(inner, max_size=20)
        ),
        max_leaves=40,
    )
)
def test_the_hooks_fast_path_names_outputs_as_the_general_walk(spec: Any) -> None:
    """The forward hook's flat-tuple fast path (_float_outputs) finds the same tensors at the
    same positions as iter_float_tensors, for any output structure."""
    out = _build(spec)
    if isinstance(out, torch.Tensor):
        return  # one tensor: the hook's own first case
    got = _float_outputs(out)
    want = list(iter_float_tensors(out))
    assert [p for p, _ in got] == [p for p, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(got, want, strict=True))
