"""Per-unit ops and helpers against a float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from dnntrace import ops_units
from dnntrace.stats import units as U


def unit_summary_ref(x: np.ndarray, dim: int, lo: float, hi: float) -> np.ndarray:
    """[units, 6]: count, sum, sumsq, firing, saturated, max (NaN excluded from max)."""
    v = np.moveaxis(x.astype(np.float64), dim, 0)
    v = v.reshape(x.shape[dim], v.size // x.shape[dim] if x.shape[dim] else 0)
    with np.errstate(invalid="ignore"):
        sat = (v <= lo) | (v >= hi)
        mx = np.where(np.isnan(v), -np.inf, v).max(axis=1) if v.shape[1] else -np.inf
    return np.stack(
        [
            np.full(v.shape[0], v.shape[1], np.float64),
            v.sum(1),
            (v * v).sum(1),
            (v > 0).sum(1),
            sat.sum(1),
            np.broadcast_to(mx, (v.shape[0],)),
        ],
        axis=1,
    )


def unit_grad_summary_ref(g: np.ndarray, x: np.ndarray | None, dim: int) -> np.ndarray:
    d = dim % g.ndim
    if g.size == 0:  # an empty batch adds nothing, not even rows
        return np.zeros((g.shape[d], 5))
    rows = math.prod(g.shape[:d])
    gv = np.moveaxis(g.astype(np.float64), d, 0).reshape(g.shape[d], -1)
    p = (
        gv * np.moveaxis(x.astype(np.float64), d, 0).reshape(g.shape[d], -1)
        if x is not None
        else np.zeros_like(gv)  # without x the attribution columns stay 0
    )
    return np.stack(
        [
            np.full(gv.shape[0], rows, np.float64),
            np.full(gv.shape[0], gv.shape[1], np.float64),
            (gv * gv).sum(1),
            p.sum(1),
            np.abs(p).sum(1),
        ],
        axis=1,
    )


def _run(fn, x: torch.Tensor, dim: int, lo: float, hi: float) -> np.ndarray:
    acc = U.new_act_acc(x.shape[dim], "cpu")
    fn(x, dim, lo, hi, acc)
    return acc.numpy()


floats = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-1e3, max_value=1e3)


@given(
    x=arrays(
        np.float32, array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9), elements=floats
    ),
    data=st.data(),
)
def test_unit_summary_matches_ref(x: np.ndarray, data: st.DataObject) -> None:
    dim = data.draw(st.integers(-x.ndim, x.ndim - 1))
    lo, hi = data.draw(st.sampled_from([(-0.5, 0.5), (0.0, math.nan), (math.nan, math.nan)]))
    ref = unit_summary_ref(x, dim, lo, hi)
    t = torch.from_numpy(x)
    for fn in (ops_units.unit_summary_out, U.unit_summary_torch):
        got = _run(fn, t, dim, lo, hi)
        np.testing.assert_allclose(got[:, :5], ref[:, :5], rtol=1e-9, atol=1e-6)
        if x.size:
            np.testing.assert_array_equal(got[:, 5], ref[:, 5])


@given(
    g=arrays(
        np.float32, array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9), elements=floats
    ),
    data=st.data(),
)
def test_unit_grad_summary_matches_ref(g: np.ndarray, data: st.DataObject) -> None:
    dim = data.draw(st.integers(-g.ndim, g.ndim - 1))
    x = (
        data.draw(arrays(np.float32, g.shape, elements=floats))
        if data.draw(st.booleans())
        else None
    )
    ref = unit_grad_summary_ref(g, x, dim)
    tx = None if x is None else torch.from_numpy(x)
    for fn in (ops_units.unit_grad_summary_out, U.unit_grad_summary_torch):
        acc = U.new_grad_acc(g.shape[dim], "cpu")
        fn(torch.from_numpy(g), tx, dim, acc)
        np.testing.assert_allclose(acc.numpy(), ref, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,dim", [((64, 300), -1), ((5, 7, 6, 6), 1), ((3, 4, 9), -1)])
def test_other_dtypes_and_large_inputs(
    dtype: torch.dtype, shape: tuple[int, ...], dim: int
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = unit_summary_ref(x.double().numpy(), dim, -1.0, 1.0)
    got = _run(ops_units.unit_summary_out, x, dim, -1.0, 1.0)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


def test_nan_poisons_sums_not_firing_or_max() -> None:
    x = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    got = _run(ops_units.unit_summary_out, x, -1, math.nan, math.nan)
    assert got[0, 1] == 3.0 and math.isnan(got[1, 1])
    assert got[1, 3] == 1.0 and got[1, 5] == 3.0


def test_accumulates_and_folds_max() -> None:
    acc = U.new_act_acc(2, "cpu")
    ops_units.unit_summary_out(torch.tensor([[1.0, -1.0]]), -1, math.nan, math.nan, acc)
    ops_units.unit_summary_out(torch.tensor([[0.5, 4.0]]), -1, math.nan, math.nan, acc)
    np.testing.assert_array_equal(acc[:, 0].numpy(), [2, 2])
    np.testing.assert_array_equal(acc[:, 5].numpy(), [1.0, 4.0])
    U.reset_act_acc(acc)
    assert acc[:, :5].abs().sum() == 0 and (acc[:, 5] == -math.inf).all()


def test_errors_name_the_problem() -> None:
    with pytest.raises(RuntimeError, match="acc must be"):
        ops_units.unit_summary_out(
            torch.ones(2, 3), -1, 0.0, 1.0, torch.zeros(2, 6, dtype=torch.float64)
        )
    with pytest.raises(RuntimeError, match="floating"):
        ops_units.unit_summary_out(
            torch.ones(2, 3, dtype=torch.int64), -1, 0.0, 1.0, U.new_act_acc(3, "cpu")
        )
    with pytest.raises(RuntimeError, match="differ in shape"):
        ops_units.unit_grad_summary_out(
            torch.ones(2, 3), torch.ones(3, 2), -1, U.new_grad_acc(3, "cpu")
        )


def test_opcheck() -> None:
    x = torch.randn(4, 3, 5)
    torch.library.opcheck(
        torch.ops.dnntrace.unit_summary_out.default, (x, 1, -0.5, 0.5, U.new_act_acc(3, "cpu"))
    )
    torch.library.opcheck(
        torch.ops.dnntrace.unit_grad_summary_out.default,
        (x, x.clone(), 1, U.new_grad_acc(3, "cpu")),
    )


def test_vectors() -> None:
    x = torch.tensor([[1.0, -2.0, 0.0], [3.0, -4.0, 0.0]])
    acc = U.new_act_acc(3, "cpu")
    U.unit_summary_out(x, -1, 0.0, math.nan, acc)
    v = U.act_vectors(acc)
    np.testing.assert_allclose(v["unit_mean"].numpy(), [2.0, -3.0, 0.0])
    np.testing.assert_allclose(v["unit_sq_mean"].numpy(), [5.0, 10.0, 0.0])
    np.testing.assert_allclose(v["unit_firing"].numpy(), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(v["unit_saturated"].numpy(), [0.0, 1.0, 1.0])
    np.testing.assert_allclose(v["unit_max"].numpy(), [3.0, -2.0, 0.0])
    g = torch.tensor([[1.0, 1.0, 2.0], [-1.0, 3.0, 2.0]])
    gacc = U.new_grad_acc(3, "cpu")
    U.unit_grad_summary_out(g, x, -1, gacc)
    gv = U.grad_vectors(gacc)
    np.testing.assert_allclose(gv["unit_grad_rms"].numpy(), [1.0, math.sqrt(5.0), 2.0], rtol=1e-6)
    np.testing.assert_allclose(gv["unit_attr"].numpy(), [(1 - 3) / 2, (-2 - 12) / 2, 0.0])
    np.testing.assert_allclose(gv["unit_attr_abs"].numpy(), [(1 + 3) / 2, (2 + 12) / 2, 0.0])


def test_saturation_bounds() -> None:
    lo, hi = U.saturation_bounds("tanh", pre_activation=True)
    assert math.tanh(hi) == pytest.approx(0.97) and lo == -hi
    lo, hi = U.saturation_bounds("sigmoid", pre_activation=True, sigmoid=(0.1, 0.9))
    assert 1 / (1 + math.exp(-lo)) == pytest.approx(0.1)
    assert 1 / (1 + math.exp(-hi)) == pytest.approx(0.9)
    assert U.saturation_bounds("relu", pre_activation=False)[0] == 0.0
    assert all(math.isnan(b) for b in U.saturation_bounds(None, pre_activation=False))


def test_per_sample_and_topk_merge_across_steps() -> None:
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (N, C, L)
    np.testing.assert_array_equal(U.per_sample(x, 1).numpy(), x.amax(2).numpy())
    assert U.per_sample(torch.ones(5), -1) is None
    tk = U.TopK.new(units=2, k=3, device="cpu")
    rng = np.random.default_rng(0)
    seen: list[tuple[float, float, float, int]] = []  # value, id, step, unit
    for step in range(4):
        s = rng.normal(size=(5, 2)).astype(np.float32)
        ids = np.arange(5, dtype=np.float32) + 10 * step
        tk.merge(torch.from_numpy(s), torch.from_numpy(ids), step)
        seen += [(s[i, u], ids[i], step, u) for i in range(5) for u in range(2)]
    for u in range(2):
        best = sorted((t for t in seen if t[3] == u), key=lambda t: -t[0])[:3]
        np.testing.assert_array_equal(tk.values[u].numpy(), [b[0] for b in best])
        np.testing.assert_array_equal(tk.ids[u].numpy(), [b[1] for b in best])
        np.testing.assert_array_equal(tk.steps[u].numpy(), [b[2] for b in best])
