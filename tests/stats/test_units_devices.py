"""The native per-unit ops on every device against the float64 numpy references of
``test_units``: fp16/bf16/fp32/fp64, NaN/Inf, empty and huge inputs, channels_last maps, and the
top-k merge against a stable descending sort. The CUDA variants run the same assertions (skipped,
not missing, without a GPU) and must give the CPU kernel's integer columns and top-k lists bit for
bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from test_units import unit_grad_summary_ref, unit_summary_ref

from _devices import cpu_and_cuda
from dnntrace import ops_units
from dnntrace.stats import units as U

DEVICES = cpu_and_cuda()
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BOUNDS = [(-0.5, 0.5), (0.0, math.nan), (math.nan, math.nan), (-1e30, 2.0)]
INT_COLS = [0, 3, 4]  # count, firing, saturated: sums of integers, exact on every device

# Any float32 value, NaN and ±Inf included, plus many exact zeros and ties.
specials = st.sampled_from([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e-40, 3e38])
values = st.one_of(st.floats(width=32), specials)


def _check_act(got: np.ndarray, ref: np.ndarray, bound: np.ndarray | None = None) -> None:
    """Integer columns and max exact; sums within 1e-9 relative, or within ``bound`` ([units,
    2] absolute, _sum_error_bound) where given; non-finite sums exact."""
    np.testing.assert_array_equal(got[:, INT_COLS], ref[:, INT_COLS])
    np.testing.assert_array_equal(got[:, 5], ref[:, 5])
    if bound is None:
        np.testing.assert_allclose(got[:, 1:3], ref[:, 1:3], rtol=1e-9, atol=1e-300)
        return
    a, b = got[:, 1:3], ref[:, 1:3]
    finite = np.isfinite(b)
    np.testing.assert_array_equal(a[~finite], b[~finite])
    err = np.abs(a[finite] - b[finite])
    assert (err <= np.maximum(bound[finite], 1e-9 * np.abs(b[finite]))).all(), (a, b, bound)


def _sum_error_bound(x: np.ndarray, dim: int) -> np.ndarray:
    """[units, 2]: what rounding can add to a float64 sum (and sum of squares) of each unit's n
    values in any order, n * 2^-52 * sum |v| (Higham, "Accuracy and Stability of Numerical
    Algorithms", 2nd ed., §4.2): the per-unit sums are not compensated, so a unit whose values
    cancel (1, -1, 1.6e-12, 1.6e-12) is only this close to the exact sum. 0 where a sum is not
    finite (those must match exactly)."""
    v = np.moveaxis(x.astype(np.float64), dim, 0)
    v = v.reshape(x.shape[dim], v.size // x.shape[dim] if x.shape[dim] else 0)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.stack([np.abs(v).sum(1), (v * v).sum(1)], axis=1) * v.shape[1] * 2.0**-52
    return np.where(np.isfinite(scale), scale, 0.0)


def _act(x: torch.Tensor, dim: int, lo: float, hi: float) -> np.ndarray:
    acc = U.new_act_acc(x.shape[dim], x.device)
    ops_units.unit_summary_out(x, dim, lo, hi, acc)
    return acc.cpu().numpy()


def _grad(g: torch.Tensor, x: torch.Tensor | None, dim: int) -> np.ndarray:
    acc = U.new_grad_acc(g.shape[dim], g.device)
    ops_units.unit_grad_summary_out(g, x, dim, acc)
    return acc.cpu().numpy()


@pytest.mark.parametrize("device", DEVICES)
@given(
    x=arrays(
        np.float32, array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9), elements=values
    ),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_unit_summary_every_dtype(device: str, x: np.ndarray, dtype: torch.dtype, data) -> None:
    dim = data.draw(st.integers(-x.ndim, x.ndim - 1))
    lo, hi = data.draw(st.sampled_from(BOUNDS))
    t = torch.from_numpy(x).to(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = unit_summary_ref(t.double().numpy(), dim, lo, hi)  # the values the kernel sees
        bound = _sum_error_bound(t.double().numpy(), dim)
    _check_act(_act(t.to(device), dim, lo, hi), ref, bound)


@pytest.mark.parametrize("device", DEVICES)
@given(
    g=arrays(
        np.float32, array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9), elements=values
    ),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_unit_grad_summary_every_dtype(
    device: str, g: np.ndarray, dtype: torch.dtype, data
) -> None:
    dim = data.draw(st.integers(-g.ndim, g.ndim - 1))
    x = (
        data.draw(arrays(np.float32, g.shape, elements=values))
        if data.draw(st.booleans())
        else None
    )
    tg = torch.from_numpy(g).to(dtype)
    tx = None if x is None else torch.from_numpy(x).to(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = unit_grad_summary_ref(
            tg.double().numpy(), None if tx is None else tx.double().numpy(), dim
        )
        got = _grad(tg.to(device), None if tx is None else tx.to(device), dim)
    np.testing.assert_array_equal(got[:, :2], ref[:, :2])
    np.testing.assert_allclose(got[:, 2:], ref[:, 2:], rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,dim",
    [
        ((1 << 20, 3), -1),
        ((3, 1 << 20), -1),
        ((2, 3, 1 << 18), 1),
        ((64, 33, 7, 7), 1),
        ((4, 4096, 50), -1),
        ((96, 50257), -1),  # wide rows (vocabulary logits): split by units, bounded partials
    ],
)
def test_huge_inputs(device: str, dtype: torch.dtype, shape: tuple[int, ...], dim: int) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen).to(dtype)
    x.view(-1)[::97] = 0.0  # exact zeros, which neither fire nor count as negative
    ref = unit_summary_ref(x.double().numpy(), dim, -1.0, 1.5)
    _check_act(_act(x.to(device), dim, -1.0, 1.5), ref)
    g = torch.randn(shape, generator=gen).to(dtype)
    gref = unit_grad_summary_ref(g.double().numpy(), x.double().numpy(), dim)
    np.testing.assert_allclose(_grad(g.to(device), x.to(device), dim), gref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_maps_read_in_place(device: str, dtype: torch.dtype) -> None:
    x = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    x5 = torch.randn(2, 5, 3, 4, 2, generator=torch.Generator().manual_seed(1)).to(dtype)
    for t, fmt in ((x, torch.channels_last), (x5, torch.channels_last_3d)):
        cl = t.to(device).contiguous(memory_format=fmt)
        assert not cl.is_contiguous()
        ref = unit_summary_ref(t.double().numpy(), 1, -0.5, 0.5)
        _check_act(_act(cl, 1, -0.5, 0.5), ref)
        # the gradient in channels_last, its activation in the default layout (and vice versa)
        gref = unit_grad_summary_ref(t.double().numpy(), t.double().numpy(), 1)
        for g, a in ((cl, t.to(device)), (t.to(device), cl)):
            np.testing.assert_allclose(_grad(g, a, 1), gref, rtol=1e-9, atol=1e-12)


@pytest.mark.needs_cuda
def test_cuda_integer_columns_equal_the_cpu_kernel() -> None:
    gen = torch.Generator().manual_seed(5)
    for shape, dim in (((512, 1000), -1), ((32, 64, 9, 9), 1), ((8, 128, 12, 64), -2)):
        x = torch.randn(shape, generator=gen).round()  # many zeros and ties
        x.view(-1)[::13] = math.nan
        cpu = _act(x, dim, -1.0, 1.0)
        cuda = _act(x.cuda(), dim, -1.0, 1.0)
        np.testing.assert_array_equal(cuda[:, INT_COLS], cpu[:, INT_COLS])
        np.testing.assert_array_equal(cuda[:, 5], cpu[:, 5])
        np.testing.assert_allclose(cuda[:, 1:3], cpu[:, 1:3], rtol=1e-12, equal_nan=True)


# ---- top-k ---------------------------------------------------------------------------------


def topk_ref(
    state: tuple[np.ndarray, np.ndarray, np.ndarray],
    batches: list[tuple[np.ndarray, np.ndarray, int]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first k of a stable descending sort of every offer, in order (the current lists,
    then each batch's samples in order); NaN and -inf never enter; empty entries -inf / -1."""
    vals, ids, steps = (a.copy() for a in state)
    units, k = vals.shape
    for samples, sid, step in batches:
        for u in range(units):
            offers = [(vals[u, j], ids[u, j], steps[u, j]) for j in range(k)]
            offers += [(samples[b, u], sid[b], step) for b in range(samples.shape[0])]
            offers = [o for o in offers if o[0] > -np.inf]  # drops NaN and -inf
            offers.sort(key=lambda o: -o[0])  # stable
            offers = (offers + [(-np.inf, -1.0, -1.0)] * k)[:k]
            vals[u], ids[u], steps[u] = (np.array(c, np.float32) for c in zip(*offers, strict=True))
    return vals, ids, steps


topk_values = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 2.0, math.nan, math.inf, -math.inf]),
    st.floats(-4, 4, width=32),
)


@pytest.mark.parametrize("device", DEVICES)
@given(
    units=st.integers(1, 5),
    k=st.integers(1, 6),
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    data=st.data(),
)
def test_topk_update_matches_a_stable_sort(device: str, units: int, k: int, sizes, data) -> None:
    batches = []
    for i, b in enumerate(sizes):
        s = data.draw(arrays(np.float32, (b, units), elements=topk_values))
        batches.append((s, np.arange(b, dtype=np.float32) + 100 * i, i))
    tk = U.TopK.new(units, k, device)
    fallback = U.TopK.new(units, k, device)
    for s, sid, step in batches:
        tk.merge(torch.from_numpy(s).to(device), torch.from_numpy(sid).to(device), step)
        fallback.merge_torch(torch.from_numpy(s).to(device), torch.from_numpy(sid).to(device), step)
    empty = (np.full((units, k), -np.inf, np.float32), np.full((units, k), -1.0, np.float32))
    ref = topk_ref((empty[0], empty[1], empty[1].copy()), batches)
    for t in (tk, fallback):
        for got, want in zip((t.values, t.ids, t.steps), ref, strict=True):
            np.testing.assert_array_equal(got.cpu().numpy(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_large_batch_and_dtypes(device: str) -> None:
    gen = torch.Generator().manual_seed(2)
    units, k = 700, 16
    tk = U.TopK.new(units, k, device)
    batches = []
    for step in range(3):
        s = torch.randn(300, units, generator=gen).round(decimals=1)  # ties
        s[::17] = math.nan
        sid = torch.arange(300, dtype=torch.float32) * 3 + step
        batches.append((s.numpy(), sid.numpy(), step))
        tk.merge(
            s.to(device).to(torch.bfloat16).float() if step == 2 else s.to(device),
            sid.to(device),
            step,
        )
    batches[2] = (torch.from_numpy(batches[2][0]).bfloat16().float().numpy(), batches[2][1], 2)
    empty = np.full((units, k), -np.inf, np.float32), np.full((units, k), -1.0, np.float32)
    ref = topk_ref((empty[0], empty[1], empty[1].copy()), batches)
    for got, want in zip((tk.values, tk.ids, tk.steps), ref, strict=True):
        np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_topk_update_checks_its_arguments() -> None:
    tk = U.TopK.new(3, 4, "cpu")
    ids = torch.arange(2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"samples must be a floating \[batch, units\]"):
        ops_units.unit_topk_update(torch.ones(2, 3, 1), ids, 0, tk.values, tk.ids, tk.steps)
    with pytest.raises(RuntimeError, match="ids must be"):
        ops_units.unit_topk_update(torch.ones(2, 3), torch.ones(3), 0, tk.values, tk.ids, tk.steps)
    with pytest.raises(RuntimeError, match="float32"):
        ops_units.unit_topk_update(torch.ones(2, 4), ids, 0, tk.values, tk.ids, tk.steps)
    big = U.TopK.new(3, ops_units.MAX_TOPK + 1, "cpu")
    with pytest.raises(RuntimeError, match="k must be in"):
        ops_units.unit_topk_update(torch.ones(2, 3), ids, 0, big.values, big.ids, big.steps)


def test_topk_opcheck() -> None:
    tk = U.TopK.new(3, 4, "cpu")
    torch.library.opcheck(
        torch.ops.dnntrace.unit_topk_update.default,
        (torch.randn(5, 3), torch.arange(5.0), 2, tk.values, tk.ids, tk.steps),
    )


@pytest.mark.needs_cuda
def test_topk_cuda_equals_cpu() -> None:
    gen = torch.Generator().manual_seed(9)
    cpu, cuda = U.TopK.new(2000, 8, "cpu"), U.TopK.new(2000, 8, "cuda")
    for step in range(4):
        s = torch.randn(64, 2000, generator=gen).round(decimals=2)
        sid = torch.arange(64, dtype=torch.float32) + 64 * step
        cpu.merge(s, sid, step)
        cuda.merge(s.cuda(), sid.cuda(), step)
    for a, b in zip(
        (cpu.values, cpu.ids, cpu.steps), (cuda.values, cuda.ids, cuda.steps), strict=True
    ):
        assert torch.equal(a, b.cpu())
