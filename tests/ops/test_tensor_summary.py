"""``dnntrace::tensor_summary_out`` / ``tensor_summary`` against the float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _strategies import (
    DTYPES,
    VIEWS,
    WINDOWS,
    apply_view,
    bit_arrays,
    exact_f64,
    layouts,
    tensors,
)
from _support import (
    MOMENTS_ONLY_FIELDS,
    assert_counts_equal,
    assert_moments_close,
    fresh_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import dnntrace
from _devices import cpu_and_cuda
from dnntrace import _C, ops
from dnntrace.storage import Summary
from dnntrace.storage import layout as L
from dnntrace.storage.layout import Layout, row_index
from reference import (
    COUNT,
    HEADER,
    MAX,
    MIN,
    NAN,
    NEGINF,
    POSINF,
    SUM,
    SUM_COMP,
    SUMSQ,
    SUMSQ_COMP,
    ZEROS,
    row_index_ref,
    tensor_summary_ref,
    width_ref,
)

SERIAL_MAX = 2 * 64 * 1024  # the kernel goes parallel above this many elements
# Sizes around the CPU kernel's thresholds: 4096 (direct mapping below), 65536 (one chunk),
# 131072 (the first kernel's serial limit), and well above.
LONG_SIZES = [4095, 4097, 65536, 65537, SERIAL_MAX + 1, 3 * 65536 + 5, 1_000_003]


def summarize_out(
    x: torch.Tensor,
    k: int,
    emin: int,
    octaves: int,
    *,
    histogram: bool = True,
    device: str = "cpu",
    slot: int = 0,
    slots: int = 1,
):
    counts, moments = fresh_state(slots, k, emin, octaves, device)
    ops.tensor_summary_out(x, slot, counts, moments, Layout(k, emin, octaves), histogram=histogram)
    return counts.cpu().numpy(), moments.cpu().numpy()


# ---- every field against the reference ----------------------------------------------------


@pytest.mark.parametrize("device", cpu_and_cuda())
@given(data=st.data(), layout=layouts(), histogram=st.booleans())
def test_matches_reference(device, data, layout, histogram):
    k, emin, octaves = layout
    x = data.draw(tensors(emin=emin, octaves=octaves))
    values = exact_f64(x)
    want_c, want_m = tensor_summary_ref(values, k, emin, octaves)
    got_c, got_m = summarize_out(x.to(device), k, emin, octaves, histogram=histogram, device=device)
    assert_counts_equal(got_c[0], want_c, histogram=histogram)
    assert_moments_close(got_m[0], want_m, values)
    if device != "cpu":  # integer fields bit-identical to the CPU kernel
        cpu_c, cpu_m = summarize_out(x, k, emin, octaves, histogram=histogram)
        np.testing.assert_array_equal(got_c, cpu_c)
        assert cpu_m[0, MIN] == got_m[0, MIN] and cpu_m[0, MAX] == got_m[0, MAX]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", LONG_SIZES)
def test_long_tensors_match_reference(device, dtype, n):
    """The chunked, multi-threaded path, with specials scattered over chunk boundaries."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 3).exp() * torch.randn(
        n, generator=g, dtype=torch.float64
    ).sign()
    x = x.to(dtype)
    idx = torch.randint(0, n, (200,), generator=g)
    specials = torch.tensor(
        [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-30, -1e30, 2.0**-48], dtype=torch.float64
    ).to(dtype)
    x[idx] = specials.repeat(25)
    x[65535:65538] = math.nan  # straddling the first chunk boundary
    values = exact_f64(x)
    for histogram in (True, False):
        want_c, want_m = tensor_summary_ref(values, 6, -48, 64)
        got_c, got_m = summarize_out(x.to(device), 6, -48, 64, histogram=histogram, device=device)
        assert_counts_equal(got_c[0], want_c, histogram=histogram)
        assert_moments_close(got_m[0], want_m, values)


@st.composite
def tiled_tensors(draw, emin: int, octaves: int) -> torch.Tensor:
    """A drawn bit pattern (all the edge values) tiled past 4096 elements, so the long, chunked
    and multi-threaded paths see what the small-tensor tests see; sometimes viewed."""
    dtype = draw(st.sampled_from(DTYPES))
    m = draw(st.integers(1, 300))
    base = draw(bit_arrays(dtype, (m,), emin, octaves))
    n = draw(st.sampled_from([4097, 70_000, 300_000]))
    x = base.repeat(-(-n // m))
    return apply_view(x.reshape(-1, 2) if x.numel() % 2 == 0 else x, draw(st.sampled_from(VIEWS)))


@settings(max_examples=30)
@given(data=st.data(), layout=layouts(), histogram=st.booleans())
def test_long_tiled_patterns_match_reference(data, layout, histogram):
    k, emin, octaves = layout
    x = data.draw(tiled_tensors(emin, octaves))
    values = exact_f64(x)
    want_c, want_m = tensor_summary_ref(values, k, emin, octaves)
    got_c, got_m = summarize_out(x, k, emin, octaves, histogram=histogram)
    assert_counts_equal(got_c[0], want_c, histogram=histogram)
    assert_moments_close(got_m[0], want_m, values)


def test_consecutive_long_calls_do_not_leak():
    """Each call's histogram is its own, whatever earlier calls (other k, other values, other
    thread counts) left in per-thread scratch space."""
    g = torch.Generator().manual_seed(9)
    wide = torch.randn(300_000, generator=g, dtype=torch.float64).mul(30).exp2().float()
    wide *= torch.randn(300_000, generator=g).sign()
    wide[::1000] = math.nan
    wide[1::1000] = -math.inf
    wide[2::1000] = 1e-40  # subnormal
    narrow = torch.rand(300_000, generator=g) + 1.0  # one octave, positive
    negative = -torch.rand(200_000, generator=g) * 1e-3
    old = torch.get_num_threads()
    try:
        for threads, x, k in [
            (old, wide, 7),
            (old, narrow, 7),
            (1, wide, 3),
            (old, negative, 3),
            (old, wide.half(), 6),
            (1, narrow.bfloat16(), 6),
            (old, narrow, 0),
            (old, wide, 0),
            (old, negative, 0),
        ]:
            torch.set_num_threads(threads)
            want_c, _ = tensor_summary_ref(exact_f64(x), k, -48, 64)
            got_c, _ = summarize_out(x, k, -48, 64)
            assert_counts_equal(got_c[0], want_c)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("view", ["channels_last", "transpose", "step", "expand"])
def test_long_views_match_reference(view):
    """Dense non-contiguous views are read in place, others copied; both above SERIAL_MAX."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1 if view == "expand" else 8, 16, 48, 64, generator=g)
    base.view(-1)[::997] = math.nan
    x = apply_view(base, view)
    assert x.numel() > SERIAL_MAX or view == "step"
    values = exact_f64(x)
    want_c, want_m = tensor_summary_ref(values, 5, -30, 40)
    got_c, got_m = summarize_out(x, 5, -30, 40)
    assert_counts_equal(got_c[0], want_c)
    assert_moments_close(got_m[0], want_m, values)


def test_functional_op_equals_out_op():
    x = torch.randn(1000, dtype=torch.bfloat16)
    c, m = ops.tensor_summary(x, 4, -20, 30)
    got_c, got_m = summarize_out(x, 4, -20, 30)
    assert c.shape == (width_ref(4, 30),) and m.shape == (8,)
    assert c.dtype == torch.int64 and m.dtype == torch.float64
    np.testing.assert_array_equal(c.numpy(), got_c[0])
    np.testing.assert_array_equal(m.numpy(), got_m[0])
    # defaults of the schema are the documented ones
    c6, _ = torch.ops.dnntrace.tensor_summary.default(x)
    assert c6.shape == (width_ref(6, 64),)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 2), ()])
def test_empty_and_scalar(shape):
    x = torch.full(shape, -2.5)
    c, m = ops.tensor_summary(x)
    want_c, want_m = tensor_summary_ref(exact_f64(x))
    assert_counts_equal(c.numpy(), want_c)
    assert_moments_close(m.numpy(), want_m, exact_f64(x))
    if x.numel() == 0:
        assert m[MIN] == math.inf and m[MAX] == -math.inf  # untouched


def test_special_values_exactly():
    """Signed zeros, NaN of both signs, infinities and subnormals go to their own counters."""
    bits = np.array(
        [
            0x00000000,
            0x80000000,
            0x7FC00000,
            0xFFC00000,
            0x7F800001,
            0x7F800000,
            0xFF800000,
            0x00000001,
            0x80000001,
            0x3F800000,
            0xBF800000,
        ],
        np.uint32,
    )
    x = torch.from_numpy(bits.view(np.int32)).view(torch.float32)
    c, m = ops.tensor_summary(x)
    assert c[COUNT] == 11 and c[NAN] == 3 and c[POSINF] == 1 and c[NEGINF] == 1
    assert c[ZEROS] == 2
    assert c[L.NEGATIVES] == 3  # -inf, -subnormal, -1 (not -0, not the negative NaN)
    assert (c[L.UNDER_POS], c[L.UNDER_NEG]) == (1, 1)
    assert c[HEADER:].sum() == 2  # only ±1 are inside the window
    assert m[MIN] == -1.0 and m[MAX] == 1.0
    assert m[SUM] + m[SUM_COMP] == 0.0


# ---- accumulation -------------------------------------------------------------------------


@given(data=st.data(), layout=layouts(), histogram=st.booleans())
def test_two_calls_equal_the_concatenation(data, layout, histogram):
    k, emin, octaves = layout
    a = data.draw(tensors(emin=emin, octaves=octaves))
    b = data.draw(tensors(emin=emin, octaves=octaves))
    counts, moments = fresh_state(3, k, emin, octaves)
    before_c, before_m = counts.clone(), moments.clone()
    lay = Layout(k, emin, octaves)
    ops.tensor_summary_out(a, 1, counts, moments, lay, histogram=histogram)
    ops.tensor_summary_out(b, 1, counts, moments, lay, histogram=histogram)
    values = np.concatenate([exact_f64(a).reshape(-1), exact_f64(b).reshape(-1)])
    want_c, want_m = tensor_summary_ref(values, k, emin, octaves, calls=2)
    assert_counts_equal(counts[1].numpy(), want_c, histogram=histogram)
    assert_moments_close(moments[1].numpy(), want_m, values)
    # the other slots are untouched, bit for bit
    for s in (0, 2):
        assert torch.equal(counts[s], before_c[s]) and torch.equal(moments[s], before_m[s])


def test_slots_are_independent():
    lay = Layout(3, -10, 20)
    xs = [torch.randn(n) * (i + 1) for i, n in enumerate((10, 0, 300_000, 7))]
    counts, moments = fresh_state(len(xs), lay.k, lay.emin, lay.octaves)
    for slot in (2, 0, 3, 1):  # any order
        ops.tensor_summary_out(xs[slot], slot, counts, moments, lay)
    for slot, x in enumerate(xs):
        want_c, want_m = tensor_summary_ref(exact_f64(x), lay.k, lay.emin, lay.octaves)
        assert_counts_equal(counts[slot].numpy(), want_c)
        assert_moments_close(moments[slot].numpy(), want_m, exact_f64(x))


def test_no_allocation_of_new_state():
    """The op writes in place: same storage, no resize."""
    lay = Layout()
    counts, moments = fresh_state(2, lay.k, lay.emin, lay.octaves)
    pc, pm = counts.data_ptr(), moments.data_ptr()
    ops.tensor_summary_out(torch.randn(100), 1, counts, moments, lay)
    assert counts.data_ptr() == pc and moments.data_ptr() == pm
    assert counts.shape == (2, lay.width) and moments.shape == (2, 8)


# ---- argument checks ----------------------------------------------------------------------


def _state(lay: Layout = Layout(), slots: int = 2):  # noqa: B008 - frozen dataclass
    return fresh_state(slots, lay.k, lay.emin, lay.octaves)


def _call(x, slot, counts, moments, k=6, emin=-48, octaves=64):
    torch.ops.dnntrace.tensor_summary_out.default(x, slot, k, emin, octaves, True, counts, moments)


@pytest.mark.parametrize("slot", [-1, 2, 1 << 40])
def test_bad_slot_raises(slot):
    c, m = _state()
    with pytest.raises(RuntimeError, match="slot"):
        _call(torch.ones(3), slot, c, m)
    assert c.sum() == 0  # nothing written


# The message names what is accepted (floating, or the four dtypes by name).
UNSUPPORTED_DTYPE = r"dnntrace: (expected a float|unsupported dtype)"


@pytest.mark.parametrize(
    "dtype",
    [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn],
    ids=str,
)
def test_unsupported_input_dtype_raises(dtype):
    c, m = _state()
    with pytest.raises(RuntimeError, match=UNSUPPORTED_DTYPE):
        _call(torch.zeros(3).to(dtype), 0, c, m)
    assert c.sum() == 0


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda c, m: (c.int(), m), "counts"),
        (lambda c, m: (c[:, :-1].contiguous(), m), "width"),
        (lambda c, m: (c[0], m), "counts"),
        (lambda c, m: (c.t().contiguous().t(), m), "counts"),
        (lambda c, m: (c, m.float()), "moments"),
        (lambda c, m: (c, m[:, :7].contiguous()), "moments"),
        (lambda c, m: (c, m[:1].contiguous()), "moments"),
        (lambda c, m: (c, m.t().contiguous().t()), "moments"),
    ],
    ids=[
        "counts_int32",
        "counts_width",
        "counts_1d",
        "counts_noncontig",
        "moments_fp32",
        "moments_width",
        "moments_rows",
        "moments_noncontig",
    ],
)
def test_bad_state_raises(mutate, pattern):
    c, m = mutate(*_state())
    with pytest.raises(RuntimeError, match=pattern):
        _call(torch.ones(3), 0, c, m)


@pytest.mark.parametrize(
    "k, emin, octaves, pattern",
    [
        (-1, -48, 64, "k must"),
        (8, -48, 64, "k must"),
        (6, -127, 64, "emin"),
        (6, -48, 0, "octaves"),
        (6, -48, 255, "octaves"),
        (6, 100, 29, "emin \\+ octaves"),
    ],
)
def test_invalid_layout_raises(k, emin, octaves, pattern):
    c, m = _state()
    with pytest.raises(RuntimeError, match=pattern):
        _call(torch.ones(3), 0, c, m, k, emin, octaves)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.dnntrace.tensor_summary.default(torch.ones(3), k, emin, octaves)
    with pytest.raises(ValueError, match=pattern):
        Layout(k, emin, octaves)


def test_summarize_rejects_non_tensors_and_integers():
    with pytest.raises(TypeError, match="torch.Tensor"):
        dnntrace.summarize(np.ones(3))
    with pytest.raises(TypeError, match="floating"):
        dnntrace.summarize(torch.ones(3, dtype=torch.int64))


# ---- registration -------------------------------------------------------------------------


def _opcheck_samples():
    lay = Layout(5, -20, 30)
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(7, 5, generator=g),
        torch.randn(4, 6, generator=g, dtype=torch.float64).t(),
        torch.tensor([0.0, -0.0, math.nan, math.inf, -1e-30]).to(torch.float16),
        torch.randn(2, 3, 4, 5, generator=g)
        .to(torch.bfloat16)
        .contiguous(memory_format=torch.channels_last),
        torch.empty(0, 3),
    ]
    for i, x in enumerate(xs):
        c, m = fresh_state(3, lay.k, lay.emin, lay.octaves)
        yield (x, i % 3, lay.k, lay.emin, lay.octaves, i % 2 == 0, c, m)


@pytest.mark.parametrize("sample", list(range(5)))
def test_opcheck_tensor_summary_out(sample):
    args = list(_opcheck_samples())[sample]
    torch.library.opcheck(torch.ops.dnntrace.tensor_summary_out.default, args)


@pytest.mark.parametrize("sample", list(range(5)))
def test_opcheck_tensor_summary(sample):
    x, _, k, emin, octaves, *_ = list(_opcheck_samples())[sample]
    torch.library.opcheck(torch.ops.dnntrace.tensor_summary.default, (x, k, emin, octaves))
    torch.library.opcheck(torch.ops.dnntrace.tensor_summary.default, (x,))


# Inductor imports torch/utils/mkldnn.py, whose torch.jit.script_method warns (torch's own
# deprecation, raised by torch at import; nothing of ours).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph():
    lay = Layout()

    def step(x, counts, moments):
        y = torch.relu(x) * 2
        ops.tensor_summary_out(y, 1, counts, moments, lay)
        return y.sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    x = torch.randn(257, 3)
    c, m = _state(lay)
    c2, m2 = _state(lay)
    for _ in range(2):  # twice: the mutation must happen on every call, not be traced away
        out = compiled(x, c, m)
        ref = step(x, c2, m2)
        torch.testing.assert_close(out, ref)
    assert torch.equal(c, c2)
    assert torch.equal(m, m2)
    assert c[1, COUNT] == 2 * x.numel()


# ---- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_across_calls_and_thread_counts(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2_000_003, generator=g) * 1e3 + 7).to(dtype)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, old, old):
            torch.set_num_threads(threads)
            c, m = ops.tensor_summary(x)
            results.append((c.numpy().tobytes(), m.numpy().tobytes()))
    finally:
        torch.set_num_threads(old)
    assert all(r == results[0] for r in results[1:])


# ---- the bucket mapping: C++, its numpy twin and the reference ------------------------------


def _all_three_f32(bits: np.ndarray, k: int, emin: int, octaves: int):
    x = bits.astype(np.uint32).view(np.float32)
    cpp = _C.row_indices_f32(x, k, emin, octaves)
    twin = row_index(x, Layout(k, emin, octaves))
    ref = row_index_ref(x, k, emin, octaves)
    return cpp.astype(np.int64), twin, ref


@settings(max_examples=200)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64), layout=layouts())
def test_row_index_f32_three_ways(bits, layout):
    cpp, twin, ref = _all_three_f32(np.array(bits, np.uint64), *layout)
    np.testing.assert_array_equal(cpp, ref)
    np.testing.assert_array_equal(twin, ref)


@settings(max_examples=200)
@given(bits=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=64), layout=layouts())
def test_row_index_f64_three_ways(bits, layout):
    x = np.array(bits, np.uint64).view(np.float64)
    ref = row_index_ref(x, *layout)
    np.testing.assert_array_equal(_C.row_indices_f64(x, *layout).astype(np.int64), ref)
    np.testing.assert_array_equal(row_index(x, Layout(*layout)), ref)


@pytest.mark.parametrize("k", range(8))
@pytest.mark.parametrize("emin, octaves", WINDOWS)
def test_row_index_every_bf16_pattern(k, emin, octaves):
    """Every bfloat16 value (the top half of fp32 bits), and every fp32 bucket edge and its
    neighbours: exponent x top-8-mantissa grid, ±1 ulp."""
    bits = np.arange(1 << 16, dtype=np.uint64) << np.uint64(16)
    edges = bits[:, None] + np.array([0, 1, (1 << 16) - 1], np.uint64)
    for b in (bits, edges.reshape(-1) & np.uint64(0xFFFFFFFF)):
        cpp, twin, ref = _all_three_f32(b, k, emin, octaves)
        np.testing.assert_array_equal(cpp, ref)
        np.testing.assert_array_equal(twin, ref)


@pytest.mark.parametrize("k", [0, 6, 7])
def test_row_index_f64_edges(k):
    """float64 values at and around every power of two (subnormals included) and the first
    bucket edge above it."""
    base = np.ldexp(1.0, np.arange(-1074, 1023))
    cand = np.concatenate(
        [
            base,
            np.nextafter(base, 0),
            np.nextafter(base, np.inf),
            base * (1 + 2.0**-k),
            np.nextafter(base * (1 + 2.0**-k), 0),
        ]
    )
    cand = np.concatenate([cand, -cand, [0.0, -0.0, np.inf, -np.inf, np.nan]])
    for emin, octaves in WINDOWS:
        ref = row_index_ref(cand, k, emin, octaves)
        np.testing.assert_array_equal(_C.row_indices_f64(cand, k, emin, octaves), ref)
        np.testing.assert_array_equal(row_index(cand, Layout(k, emin, octaves)), ref)


def test_row_index_rejects_bad_layout():
    with pytest.raises(ValueError, match="k must"):
        _C.row_indices_f32(np.ones(2, np.float32), 9, -48, 64)
    with pytest.raises(ValueError, match="emin"):
        _C.row_indices_f64(np.ones(2), 6, -200, 64)


@pytest.mark.parametrize("bf16", [False, True])
def test_half_bits_to_float_every_pattern(bf16):
    bits = np.arange(1 << 16, dtype=np.uint16)
    got = _C.half_bits_to_float(bits, bf16)
    dt = torch.bfloat16 if bf16 else torch.float16
    want = torch.from_numpy(bits.view(np.int16)).view(dt).float().numpy()
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    # torch quiets signalling fp16 NaNs, the shared conversion keeps their payload: both NaN
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_field_constants_match_python():
    names = (
        "COUNT",
        "NAN",
        "POSINF",
        "NEGINF",
        "ZEROS",
        "NEGATIVES",
        "UNDER_POS",
        "UNDER_NEG",
        "OVER_POS",
        "OVER_NEG",
        "CALLS",
        "HEADER",
    )
    assert dict(_C.COUNT_FIELDS) == {n: getattr(L, n) for n in names}
    moment_names = ("SUM", "SUM_COMP", "SUMSQ", "SUMSQ_COMP", "MIN", "MAX", "NUM_MOMENTS")
    assert dict(_C.MOMENT_FIELDS) == {n: getattr(L, n) for n in moment_names}
    assert (_C.DEFAULT_K, _C.DEFAULT_EMIN, _C.DEFAULT_OCTAVES) == (
        L.DEFAULT_K,
        L.DEFAULT_EMIN,
        L.DEFAULT_OCTAVES,
    )
    # and both equal the reference's reading of docs/FORMAT.md
    assert (L.COUNT, L.NAN, L.POSINF, L.NEGINF, L.ZEROS, L.HEADER) == (
        COUNT,
        NAN,
        POSINF,
        NEGINF,
        ZEROS,
        HEADER,
    )
    assert (L.SUM, L.SUM_COMP, L.SUMSQ, L.SUMSQ_COMP, L.MIN, L.MAX) == (
        SUM,
        SUM_COMP,
        SUMSQ,
        SUMSQ_COMP,
        MIN,
        MAX,
    )
    assert set(MOMENTS_ONLY_FIELDS) <= set(range(L.HEADER))


# ---- precision ----------------------------------------------------------------------------


def _f64_sum_ref(x32: torch.Tensor, square: bool = False) -> float:
    """Sum of the exact float64 values (or squares, exact in float64) of an fp32 tensor: numpy's
    pairwise float64 sum per 2**20-element chunk (error < 1e-14 relative to the chunk's sum|x|),
    chunk sums added with fsum."""
    parts = []
    for chunk in x32.split(1 << 20):
        v = chunk.numpy().astype(np.float64)
        parts.append(float(np.sum(v * v if square else v)))
    return math.fsum(parts)


@pytest.mark.slow
def test_precision_1e8_fp32():
    """sum and sumsq of 10**8 fp32 values within 1e-9 of a float64 reference: data with mean
    1 (relative to the sum), and zero-mean data (relative to sum|x|)."""
    n = 10**8
    g = torch.Generator().manual_seed(11)
    x = torch.empty(n)
    x.normal_(1.0, 1.0, generator=g)
    _, m = ops.tensor_summary(x)
    s, ss = float(m[SUM] + m[SUM_COMP]), float(m[SUMSQ] + m[SUMSQ_COMP])
    ref_s, ref_ss = _f64_sum_ref(x), _f64_sum_ref(x, square=True)
    assert abs(s - ref_s) <= 1e-9 * abs(ref_s)
    assert abs(ss - ref_ss) <= 1e-9 * ref_ss
    x -= 1.0  # now zero-mean: the sum is ~1e4 while sum|x| ~ 8e7
    _, m = ops.tensor_summary(x)
    s = float(m[SUM] + m[SUM_COMP])
    ref_s = _f64_sum_ref(x)
    abs_sum = float(sum(float(c.abs().double().sum()) for c in x.split(1 << 20)))
    assert abs(s - ref_s) <= 1e-9 * abs_sum


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loc", [0.0, 3.0])
def test_low_precision_no_worse_than_torch(dtype, loc):
    """Against the float64 reference of the same (rounded) values, the op's mean and std errors
    are at most 2x those of plain torch computing at the input dtype."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(1_000_000, generator=g) + loc).to(dtype)
    v = exact_f64(x)
    ref_mean = math.fsum(v.tolist()) / v.size
    ref_std = math.sqrt(math.fsum(((v - ref_mean) ** 2).tolist()) / v.size)
    s = dnntrace.summarize(x)
    torch_mean = float(x.mean())
    torch_std = float(x.std(correction=0))
    assert abs(s.mean - ref_mean) <= 2 * abs(torch_mean - ref_mean)
    assert abs(s.std - ref_std) <= 2 * abs(torch_std - ref_std)
    # and absolutely close (the op computes in float64)
    assert abs(s.mean - ref_mean) <= 1e-12 * (abs(ref_mean) + ref_std)


def test_float64_sum_overflow_is_inf_not_nan():
    """Finite float64 values whose sum overflows: the sum is +inf (as torch.sum gives), and the
    sum of squares too; NaN would read as 'the data had NaN'."""
    x = torch.tensor([1e308, 1e308, -1.0], dtype=torch.float64)
    c, m = ops.tensor_summary(x)
    assert c[NAN] == 0
    s = Summary(c.numpy(), m.numpy(), Layout())
    assert s.sum == math.inf, f"sum of finite values overflowing gives {s.sum}"
    assert s.sumsq == math.inf


# ---- more than 2**31 elements -------------------------------------------------------------


@pytest.mark.slow
def test_more_than_2_pow_31_elements():
    """2**31 + 17 fp16 values (4.3 GB): counts are int64 end to end and exact, including a
    single bucket holding more than 2**31 values."""
    n = (1 << 31) + 17
    try:
        x = torch.full((n,), 1.0, dtype=torch.float16)
    except RuntimeError as e:  # pragma: no cover - a small machine
        pytest.skip(f"cannot allocate 4.3 GB: {e}")
    tail = torch.tensor([math.nan, -math.inf, 0.0, -2.0, 1.5], dtype=torch.float16)
    x[-5:] = tail
    x[0] = math.inf
    c, m = ops.tensor_summary(x)
    ones = n - 6
    one_idx = int(row_index_ref(np.array([1.0]), 6, -48, 64)[0])
    assert c[COUNT] == n
    assert c[one_idx] == ones
    assert (c[NAN], c[POSINF], c[NEGINF], c[ZEROS]) == (1, 1, 1, 1)
    assert c[L.NEGATIVES] == 2
    assert int(c[HEADER:].sum()) == ones + 2
    assert m[MIN] == -2.0 and m[MAX] == 1.5
    assert m[SUM] + m[SUM_COMP] == ones - 0.5
    assert m[SUMSQ] + m[SUMSQ_COMP] == ones + 6.25
    del x
