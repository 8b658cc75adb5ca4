"""``dnntrace::multi_tensor_summary_out``: many tensors, each into its slot, in one call."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _strategies import exact_f64, layouts, tensors
from _support import assert_counts_equal, assert_moments_close, fresh_state
from hypothesis import given, settings
from hypothesis import strategies as st

from _devices import cpu_and_cuda
from dnntrace import ops
from dnntrace.storage.layout import Layout
from reference import tensor_summary_ref


@pytest.mark.parametrize("device", cpu_and_cuda())
@given(data=st.data(), layout=layouts(), histogram=st.booleans())
def test_matches_reference_per_slot(device, data, layout, histogram):
    """Tensors of mixed dtypes, shapes and strides; several may share a slot (they add up)."""
    k, emin, octaves = layout
    n_slots = data.draw(st.integers(1, 5))
    xs = data.draw(st.lists(tensors(emin=emin, octaves=octaves, max_side=12), max_size=7))
    slots = data.draw(st.lists(st.integers(0, n_slots - 1), min_size=len(xs), max_size=len(xs)))
    counts, moments = fresh_state(n_slots, k, emin, octaves, device)
    ops.multi_tensor_summary_out(
        [x.to(device) for x in xs],
        slots,
        counts,
        moments,
        Layout(k, emin, octaves),
        histogram=histogram,
    )
    counts, moments = counts.cpu().numpy(), moments.cpu().numpy()
    for slot in range(n_slots):
        mine = [exact_f64(x).reshape(-1) for x, s in zip(xs, slots, strict=True) if s == slot]
        values = np.concatenate(mine) if mine else np.zeros(0)
        want_c, want_m = tensor_summary_ref(values, k, emin, octaves, calls=len(mine))
        assert_counts_equal(counts[slot], want_c, histogram=histogram)
        assert_moments_close(moments[slot], want_m, values)


@given(data=st.data(), layout=layouts())
def test_equals_single_calls_bit_for_bit(data, layout):
    """On the CPU the list op is the single op applied in order: identical state bits."""
    k, emin, octaves = layout
    lay = Layout(k, emin, octaves)
    xs = data.draw(st.lists(tensors(emin=emin, octaves=octaves, max_side=12), max_size=6))
    slots = data.draw(st.lists(st.integers(0, 2), min_size=len(xs), max_size=len(xs)))
    c1, m1 = fresh_state(3, k, emin, octaves)
    c2, m2 = fresh_state(3, k, emin, octaves)
    ops.multi_tensor_summary_out(xs, slots, c1, m1, lay)
    for x, s in zip(xs, slots, strict=True):
        ops.tensor_summary_out(x, s, c2, m2, lay)
    assert torch.equal(c1, c2)
    assert m1.numpy().tobytes() == m2.numpy().tobytes()


def test_long_and_short_tensors_together():
    """Tensors above and below the parallel threshold in one call."""
    g = torch.Generator().manual_seed(1)
    xs = [
        torch.randn(500_000, generator=g),
        torch.randn(3, generator=g, dtype=torch.float64),
        torch.randn(300_001, generator=g).to(torch.bfloat16),
        torch.tensor([math.nan, math.inf], dtype=torch.float16),
        torch.randn(64, 2048, generator=g).t(),
    ]
    slots = [0, 1, 0, 2, 3]
    lay = Layout(7, -40, 50)
    counts, moments = fresh_state(4, lay.k, lay.emin, lay.octaves)
    ops.multi_tensor_summary_out(xs, slots, counts, moments, lay)
    for slot in range(4):
        mine = [exact_f64(x).reshape(-1) for x, s in zip(xs, slots, strict=True) if s == slot]
        values = np.concatenate(mine)
        want_c, want_m = tensor_summary_ref(values, lay.k, lay.emin, lay.octaves, calls=len(mine))
        assert_counts_equal(counts[slot].numpy(), want_c)
        assert_moments_close(moments[slot].numpy(), want_m, values)


def test_empty_list_is_a_no_op():
    lay = Layout()
    counts, moments = fresh_state(2, lay.k, lay.emin, lay.octaves)
    before = counts.clone(), moments.clone()
    ops.multi_tensor_summary_out([], [], counts, moments, lay)
    assert torch.equal(counts, before[0]) and torch.equal(moments, before[1])


def _call(xs, slots, counts, moments, k=6, emin=-48, octaves=64):
    torch.ops.dnntrace.multi_tensor_summary_out.default(
        xs, slots, k, emin, octaves, True, counts, moments
    )


def test_length_mismatch_raises():
    c, m = fresh_state(2, 6, -48, 64)
    with pytest.raises(RuntimeError, match="2 tensors but 1 slots"):
        _call([torch.ones(2), torch.ones(3)], [0], c, m)
    assert c.sum() == 0


@pytest.mark.parametrize("slot", [-1, 2])
def test_bad_slot_raises(slot):
    c, m = fresh_state(2, 6, -48, 64)
    with pytest.raises(RuntimeError, match="slot"):
        _call([torch.ones(2), torch.ones(3)], [0, slot], c, m)


@pytest.mark.parametrize("bad", ["slot", "dtype"])
def test_bad_member_is_rejected_before_anything_is_written(bad):
    """A bad argument anywhere in the list leaves the state untouched (no half-applied call)."""
    c, m = fresh_state(2, 6, -48, 64)
    xs = [torch.ones(2), torch.ones(3, dtype=torch.int32 if bad == "dtype" else torch.float32)]
    with pytest.raises(RuntimeError):
        _call(xs, [0, 5 if bad == "slot" else 1], c, m)
    assert c.sum() == 0, "tensor 0 was accumulated before tensor 1 was checked"


def test_non_floating_member_raises():
    c, m = fresh_state(2, 6, -48, 64)
    with pytest.raises(RuntimeError, match=r"dnntrace: (expected a float|unsupported dtype)"):
        _call([torch.ones(2), torch.ones(3, dtype=torch.int32)], [0, 1], c, m)


@pytest.mark.parametrize("k, pattern", [(8, "k must"), (-1, "k must")])
def test_invalid_layout_raises(k, pattern):
    c, m = fresh_state(2, 6, -48, 64)
    with pytest.raises(RuntimeError, match=pattern):
        _call([torch.ones(2)], [0], c, m, k=k)


def test_bad_state_raises():
    c, m = fresh_state(2, 6, -48, 64)
    with pytest.raises(RuntimeError, match="width"):
        _call([torch.ones(2)], [0], c, m, k=5)
    with pytest.raises(RuntimeError, match="moments"):
        _call([torch.ones(2)], [0], c, m.float())


def _samples():
    lay = Layout(4, -30, 40)
    g = torch.Generator().manual_seed(2)
    lists = [
        ([torch.randn(5, generator=g), torch.randn(3, 4, generator=g).t()], [0, 2]),
        ([torch.randn(6, generator=g).half(), torch.randn(2, generator=g).bfloat16()], [1, 1]),
        ([torch.empty(0), torch.randn(2, 2, generator=g, dtype=torch.float64)], [2, 0]),
        ([torch.randn(10, generator=g)], [1]),
    ]
    for i, (xs, slots) in enumerate(lists):
        c, m = fresh_state(3, lay.k, lay.emin, lay.octaves)
        yield (xs, slots, lay.k, lay.emin, lay.octaves, i % 2 == 0, c, m)


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    args = list(_samples())[sample]
    torch.library.opcheck(torch.ops.dnntrace.multi_tensor_summary_out.default, args)


def _spread(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Both signs over ~60 octaves (below, inside and above the narrow windows drawn), zeros,
    subnormals, ±Inf and NaN: every class of raw id the fold maps into a row."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * 60 - 40)
    sign = torch.where(torch.rand(n, generator=g) < 0.4, -1.0, 1.0).double()
    x = (mag * sign).to(dtype)
    x[::997] = 0.0
    x[5::1231] = -0.0
    x[7::4099] = math.inf
    x[9::5003] = -math.inf
    x[11::7001] = math.nan
    x[13::3001] = torch.finfo(dtype).tiny / 4  # subnormal
    return x


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", [(6, -48, 64), (7, -126, 254), (2, -10, 20)])
def test_runs_across_tensors_match_reference(threads, layout):
    """Long tensors in one call: the threads take runs of chunks that cross tensors, so a
    tensor's raw-id table is folded by one or both threads, into its row, under its lock."""
    lens = [65_536 * 3 + 5, 5_000, 131_072, 4_096, 200_000, 70_001]
    dtypes = [
        torch.float32,
        torch.bfloat16,
        torch.float32,
        torch.float16,
        torch.float16,
        torch.float32,
    ]
    xs = [_spread(n, i, dt) for i, (n, dt) in enumerate(zip(lens, dtypes, strict=True))]
    slots = [3, 0, 5, 1, 2, 4]
    lay = Layout(*layout)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        counts, moments = fresh_state(6, lay.k, lay.emin, lay.octaves)
        ops.multi_tensor_summary_out(xs, slots, counts, moments, lay)
    finally:
        torch.set_num_threads(saved)
    for x, s in zip(xs, slots, strict=True):
        values = exact_f64(x).reshape(-1)
        want_c, want_m = tensor_summary_ref(values, lay.k, lay.emin, lay.octaves)
        assert_counts_equal(counts[s].numpy(), want_c)
        assert_moments_close(moments[s].numpy(), want_m, values)


def _on_one_and_two_threads(call, rows: int, lay: Layout):
    """(counts, moments) of `call(counts, moments)` on one thread, then on two; both checked
    bit for bit equal."""
    out = []
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            counts, moments = fresh_state(rows, lay.k, lay.emin, lay.octaves)
            call(counts, moments)
            out.append((counts, moments))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1].numpy().tobytes() == out[1][1].numpy().tobytes()
    return out[1]


def test_thread_count_does_not_change_a_bit():
    """Chunk boundaries and the order partial sums are folded in do not depend on the threads."""
    xs = [_spread(n, 40 + n % 7, torch.float32) for n in (300_007, 9_000, 65_537, 131_072)]
    lay = Layout()
    _on_one_and_two_threads(
        lambda c, m: ops.multi_tensor_summary_out(xs, [0, 1, 2, 3], c, m, lay), 4, lay
    )


@pytest.mark.parametrize("n", [131_072, 196_608, 262_144])
def test_one_tensor_split_between_threads_does_not_change_a_bit(n):
    """One tensor of two or more 64 Ki chunks (from 2^17 values): two runs on two threads, one
    run on one thread; the same bits either way and the reference's."""
    x = _spread(n, 11, torch.float32)
    lay = Layout()
    counts, moments = _on_one_and_two_threads(
        lambda c, m: ops.tensor_summary_out(x, 0, c, m, lay), 1, lay
    )
    want_c, want_m = tensor_summary_ref(exact_f64(x).reshape(-1), lay.k, lay.emin, lay.octaves)
    assert_counts_equal(counts[0].numpy(), want_c)
    assert_moments_close(moments[0].numpy(), want_m, exact_f64(x).reshape(-1))


@settings(max_examples=12, deadline=None)
@given(
    data=st.data(),
    layout=layouts(),
    threads=st.sampled_from([1, 2]),
    histogram=st.booleans(),
)
def test_long_lists_match_reference(data, layout, threads, histogram):
    """Lists of long tensors (sizes around the 64 Ki chunk and the run boundaries, every
    dtype, values over all classes of raw id) against the reference, for 1 and 2 threads."""
    k, emin, octaves = layout
    lay = Layout(k, emin, octaves)
    sizes = st.sampled_from([4_097, 65_535, 65_536, 65_537, 131_073, 196_608, 262_144, 262_145])
    n_tensors = data.draw(st.integers(1, 4))
    xs = [
        _spread(
            data.draw(sizes),
            data.draw(st.integers(0, 1000)),
            data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        )
        for _ in range(n_tensors)
    ]
    slots = data.draw(st.permutations(range(n_tensors)))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        counts, moments = fresh_state(n_tensors, k, emin, octaves)
        ops.multi_tensor_summary_out(xs, slots, counts, moments, lay, histogram=histogram)
    finally:
        torch.set_num_threads(saved)
    for x, s in zip(xs, slots, strict=True):
        values = exact_f64(x).reshape(-1)
        want_c, want_m = tensor_summary_ref(values, k, emin, octaves)
        assert_counts_equal(counts[s].numpy(), want_c, histogram=histogram)
        assert_moments_close(moments[s].numpy(), want_m, values)
