"""``dnntrace.summarize`` and ``Summary``: fields, quantile and CDF accuracy, merging, plotting
histograms, and the ``StatBank`` that holds many summaries on a device."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import dnntrace
from dnntrace import StatBank, summarize
from dnntrace.storage import Summary
from dnntrace.storage.layout import Layout
from reference import row_index_ref, summary_fields_ref, tensor_summary_ref

# ---- drawn tensors ------------------------------------------------------------------------

_WIDTH = {np.float16: 16, np.float32: 32, np.float64: 64}


@st.composite
def float_tensors(draw) -> torch.Tensor:
    """fp16/bf16/fp32/fp64 tensors with NaN, ±Inf, ±0 and subnormals; float64 values bounded so
    that the sums stay finite."""
    np_dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    width = _WIDTH[np_dtype]
    bounded = {"min_value": -1e150, "max_value": 1e150, "allow_nan": False}
    elements = st.floats(
        width=width, allow_subnormal=True, **(bounded if width == 64 else {"allow_nan": True})
    )
    if width == 64:  # keep ±Inf and NaN reachable despite the bounds
        elements = st.one_of(elements, st.sampled_from([math.nan, math.inf, -math.inf]))
    shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=16))
    x = torch.from_numpy(draw(arrays(np_dtype, shape, elements=elements)))
    if np_dtype is np.float32 and draw(st.booleans()):
        x = x.to(torch.bfloat16)  # rounds; the reference reads the rounded values back
    return x


def exact(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float64).numpy().reshape(-1)


def check_fields(s: Summary, values: np.ndarray) -> None:
    want = summary_fields_ref(values)
    for name in ("count", "nan", "posinf", "neginf", "zeros", "negatives"):
        assert getattr(s, name) == want[name], name
    fin = values[np.isfinite(values)]
    if fin.size == 0:
        for name in ("min", "max", "mean", "var", "std", "absmax"):
            assert math.isnan(getattr(s, name)), name
        assert s.l2 == 0.0
        return
    for name in ("min", "max", "absmax"):
        assert getattr(s, name) == want[name], name
    scale = float(np.mean(np.abs(fin)))
    assert abs(s.mean - want["mean"]) <= 1e-12 * scale
    # var = sumsq/n - mean^2 (docs/FORMAT.md): its error scales with the mean of the squares
    ms = float(np.mean(fin * fin))
    assert abs(s.var - want["var"]) <= 1e-12 * ms
    assert s.var >= 0 and s.std == pytest.approx(math.sqrt(s.var), rel=1e-15)
    assert s.l2 == pytest.approx(want["l2"], rel=1e-12)


@given(x=float_tensors(), k=st.integers(0, 7))
def test_summarize_fields_match_reference(x, k):
    s = summarize(x, k)
    check_fields(s, exact(x))
    want_c, _ = tensor_summary_ref(exact(x), k, -48, 64)
    np.testing.assert_array_equal(s.counts, want_c)
    assert s.layout == Layout(k) and s.calls == 1


def test_summarize_does_not_need_grad_and_keeps_the_graph():
    w = torch.randn(10, requires_grad=True)
    y = w * 2
    s = summarize(y)
    assert s.count == 10
    y.sum().backward()  # the graph was not disturbed
    assert torch.equal(w.grad, torch.full((10,), 2.0))


def test_summarize_custom_window():
    x = torch.tensor([1e-6, 1.0, 100.0, -1e5, 0.0])
    s = summarize(x, 5, emin=-10, octaves=12)  # window [2**-10, 2**2)
    assert s.underflow == (0, 1) and s.overflow == (1, 1)
    assert s.layout == Layout(5, -10, 12)


# ---- quantiles on named distributions -----------------------------------------------------

N = 1_000_000


def _named(name: str) -> np.ndarray:
    rng = np.random.default_rng(1000 + DISTRIBUTIONS.index(name))  # fixed seed per dataset
    if name == "weights N(0, 0.02)":
        x = rng.normal(0.0, 0.02, N)
    elif name == "relu, 50% zeros":
        x = np.maximum(rng.normal(0.0, 1.0, N), 0.0)
    elif name == "gradients t(2) * 1e-4":
        x = rng.standard_t(2, N) * 1e-4
    elif name == "log-normal sigma=3":
        x = rng.lognormal(0.0, 3.0, N)
    else:  # pragma: no cover
        raise KeyError(name)
    return x.astype(np.float32)


DISTRIBUTIONS = (
    "weights N(0, 0.02)",
    "relu, 50% zeros",
    "gradients t(2) * 1e-4",
    "log-normal sigma=3",
)
QS = np.array([1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999])


@pytest.fixture(scope="module", params=DISTRIBUTIONS)
def named(request):
    x = _named(request.param)
    return request.param, x, torch.from_numpy(x)


def test_quantile_inside_default_window_when_tail_overflows():
    """With the default window, the log-normal's quantiles below 2**16 keep the bound, and the
    overflowing top ones are placed at the finite max."""
    x = _named("log-normal sigma=3")
    s = summarize(torch.from_numpy(x))
    assert s.overflow[1] > 0
    true = np.quantile(x.astype(np.float64), QS, method="inverted_cdf")
    got = s.quantile(QS)
    inside = np.abs(true) < 2.0**16
    assert np.all(np.abs(got - true)[inside] <= 2.0**-7 * np.abs(true[inside]))
    assert s.quantile(1.0) == float(x.max())


@pytest.mark.parametrize("k", [4, 5, 6, 7])
def test_quantile_relative_error_bound(named, k):
    """|quantile(q) - true| <= 2**-(k+1) |true| for q in [1e-4, 0.9999] whose true value is
    inside the window. The default window [2**-48, 2**16) cuts the top 1e-4 of the log-normal
    (values above 65536), so that one is also summarised with a window reaching 2**32."""
    name, x, t = named
    emin, octaves = (-32, 64) if name.startswith("log-normal") else (-48, 64)
    s = summarize(t, k, emin=emin, octaves=octaves)
    assert s.underflow == (0, 0) and s.overflow == (0, 0)
    true = np.quantile(x.astype(np.float64), QS, method="inverted_cdf")
    got = s.quantile(QS)
    assert isinstance(got, np.ndarray) and got.shape == QS.shape
    bound = 2.0 ** -(k + 1)
    rel = np.abs(got - true) / np.where(true == 0, 1.0, np.abs(true))
    worst = int(np.argmax(rel))
    assert np.all(np.abs(got - true) <= bound * np.abs(true)), (
        f"{name}, k={k}: q={QS[worst]} got {got[worst]!r} true {true[worst]!r}, "
        f"relative error {rel[worst]:.3g} > {bound:.3g}"
    )
    # a scalar q gives a float
    assert isinstance(s.quantile(0.5), float)


def test_cdf_close_to_empirical(named):
    """cdf(v) is monotone, in [0, 1], and off the empirical CDF by at most the mass of v's
    bucket (the CDF is interpolated linearly inside a bucket)."""
    name, x, t = named
    s = summarize(t)
    xs = np.sort(x.astype(np.float64))
    vs = np.quantile(xs, np.linspace(0.001, 0.999, 101), method="inverted_cdf")
    vs = vs[vs != 0]  # zeros: their own atom, checked below
    got = np.asarray(s.cdf(vs))
    assert np.all(np.diff(got) >= 0) and np.all((got >= 0) & (got <= 1))
    emp = np.searchsorted(xs, vs, side="right") / xs.size
    idx = row_index_ref(vs, 6, -48, 64)
    mass = s.counts[idx] / xs.size
    assert np.all(np.abs(got - emp) <= mass + 1e-12), name
    assert s.cdf(float(xs[-1])) == pytest.approx(1.0)
    assert s.cdf(float(xs[0]) - 1.0) == 0.0
    if name.startswith("relu"):  # the atom at 0 is counted whole
        assert s.cdf(0.0) == pytest.approx(np.mean(xs <= 0.0), abs=1e-12)


@given(
    x=arrays(
        np.float32,
        st.integers(1, 200),
        elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False),
    ),
    v=st.lists(st.floats(-2e6, 2e6), min_size=2, max_size=20),
)
def test_cdf_monotone_and_bounded(x, v):
    s = summarize(torch.from_numpy(x))
    v = np.sort(np.array(v))
    got = np.asarray(s.cdf(v))
    assert np.all(np.diff(got) >= -1e-15)
    assert np.all((got >= 0) & (got <= 1))


_IN_WINDOW = st.one_of(
    st.just(0.0),
    st.floats(2.0**-48, 2.0**16, exclude_max=True, width=32),
    st.floats(-(2.0**16), -(2.0**-48), exclude_min=True, width=32),
)


@given(
    x=arrays(np.float32, st.integers(1, 300), elements=_IN_WINDOW),
    qs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=10),
    k=st.integers(0, 7),
)
def test_quantile_bound_any_data_inside_the_window(x, qs, k):
    s = summarize(torch.from_numpy(x), k)
    true = np.quantile(x.astype(np.float64), qs, method="inverted_cdf")
    got = np.asarray(s.quantile(qs))
    assert np.all(np.abs(got - true) <= 2.0 ** -(k + 1) * np.abs(true))


def test_quantile_rejects_out_of_range():
    s = summarize(torch.randn(10))
    for q in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="quantile"):
            s.quantile(q)


def test_quantile_extremes_and_specials():
    x = torch.tensor([-math.inf, -3.0, 0.0, 0.0, 5.0, math.nan, math.inf])
    s = summarize(x)
    assert s.quantile(0.0) == -math.inf
    assert s.quantile(1.0) == math.inf
    assert s.quantile(0.5) == 0.0  # 6 non-NaN values, rank 3 is a zero
    assert s.quantile(3 / 6 + 1e-9) == 0.0
    assert s.quantile(5 / 6) == pytest.approx(5.0, rel=2**-7)


# ---- merge --------------------------------------------------------------------------------


@given(parts=st.lists(float_tensors(), min_size=1, max_size=4), data=st.data())
def test_merge_is_order_free_and_equals_the_concatenation(parts, data):
    summaries = [summarize(p) for p in parts]
    order = data.draw(st.permutations(range(len(parts))))
    left = summaries[0]
    for s in summaries[1:]:
        left = left.merge(s)
    right = summaries[order[0]]
    for i in order[1:]:
        right = summaries[i] + right
    values = np.concatenate([exact(p) for p in parts])
    for m in (left, right):
        check_fields(m, values)
        assert m.calls == len(parts)
        want_c, _ = tensor_summary_ref(values, calls=len(parts))
        np.testing.assert_array_equal(m.counts, want_c)
    np.testing.assert_array_equal(left.counts, right.counts)


@given(a=float_tensors(), b=float_tensors(), c=float_tensors())
def test_merge_is_associative(a, b, c):
    sa, sb, sc = summarize(a), summarize(b), summarize(c)
    one = (sa + sb) + sc
    two = sa + (sb + sc)
    np.testing.assert_array_equal(one.counts, two.counts)
    assert one.min == two.min or (math.isnan(one.min) and math.isnan(two.min))
    assert one.max == two.max or (math.isnan(one.max) and math.isnan(two.max))
    values = np.concatenate([exact(t) for t in (a, b, c)])
    scale = float(np.sum(np.abs(values[np.isfinite(values)])))
    assert abs(one.sum - two.sum) <= 1e-15 * scale
    assert one.sumsq == pytest.approx(two.sumsq, rel=1e-15, abs=0)


def test_merge_with_empty_is_identity():
    s = summarize(torch.randn(100))
    e = Summary.empty()
    for m in (s + e, e + s):
        np.testing.assert_array_equal(m.counts, s.counts)
        assert (m.sum, m.sumsq, m.min, m.max) == (s.sum, s.sumsq, s.min, s.max)


def test_merge_refuses_mismatched_layouts():
    a = summarize(torch.randn(10), 6)
    b = summarize(torch.randn(10), 5)
    with pytest.raises(ValueError) as info:
        a.merge(b)
    msg = str(info.value)
    assert "k=6" in msg and "k=5" in msg
    c = summarize(torch.randn(10), 6, emin=-20, octaves=30)
    with pytest.raises(ValueError, match="emin=-20"):
        a + c


# ---- plotting histograms ------------------------------------------------------------------


@given(x=float_tensors(), bins=st.integers(1, 40))
def test_linear_histogram_counts_every_finite_value(x, bins):
    s = summarize(x)
    edges, counts = s.histogram(bins)
    assert edges.shape == (bins + 1,) and counts.shape == (bins,)
    assert np.all(np.diff(edges) > 0)
    assert np.all(counts >= 0)
    assert counts.sum() == pytest.approx(s.finite, rel=1e-9, abs=1e-9), (
        f"{counts.sum()} counted of {s.finite} finite values (zeros {s.zeros})"
    )


@pytest.mark.parametrize("values", [[70000.0, 1.0], [1e-20, 2e-20], [-1e5, 3.0]])
def test_linear_histogram_keeps_values_outside_the_window(values):
    """Default window [2**-48, 2**16): 70000 overflows, 1e-20 underflows. Every finite value is
    still in some bin of the default range [min, max] (as quantile() places them)."""
    s = summarize(torch.tensor(values))
    _, counts = s.histogram(4)
    assert counts.sum() == pytest.approx(len(values))


def test_linear_histogram_close_to_numpy(named):
    name, x, t = named
    s = summarize(t)
    lo, hi = np.quantile(x, [0.01, 0.99])
    edges, counts = s.histogram(50, range=(float(lo), float(hi)))
    want, _ = np.histogram(x.astype(np.float64), bins=edges)
    # mass is spread uniformly inside a bucket: a small L1 difference, not an exact match
    assert np.abs(counts - want).sum() <= 0.02 * want.sum(), name


def test_log_histogram_edges_ascending_and_counts_match():
    x = torch.cat([torch.randn(10_000) * 1e-3, -torch.rand(100) * 50, torch.zeros(10)])
    s = summarize(x, 5)
    edges, counts = s.histogram("log")
    assert edges.shape == (counts.size + 1,)
    assert np.all(np.diff(edges) > 0)
    assert counts.sum() == s.finite - s.zeros - sum(s.underflow) - sum(s.overflow)
    assert edges[0] <= s.min and edges[-1] >= s.max
    with pytest.raises(ValueError, match="bins"):
        s.histogram("linear")
    with pytest.raises(ValueError, match="bins"):
        s.histogram(0)


# ---- empty and all-NaN --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_empty_tensor(shape):
    s = summarize(torch.empty(shape))
    assert (s.count, s.nan, s.finite, s.zeros) == (0, 0, 0, 0)
    for v in (s.mean, s.var, s.std, s.min, s.max, s.absmax, s.quantile(0.5)):
        assert math.isnan(v)
    assert np.all(np.isnan(s.quantile([0.1, 0.9])))
    assert math.isnan(s.cdf(0.0))
    assert s.l2 == 0.0 and s.sum == 0.0
    edges, counts = s.histogram(10)
    assert counts.sum() == 0
    assert s.histogram("log")[1].size == 0
    repr(s)


def test_all_nan_tensor():
    s = summarize(torch.full((5, 7), math.nan, dtype=torch.bfloat16))
    assert (s.count, s.nan, s.finite) == (35, 35, 0)
    assert math.isnan(s.mean) and math.isnan(s.quantile(0.5)) and math.isnan(s.min)
    assert math.isnan(s.cdf(1.0))
    repr(s)


def test_all_infinite_tensor():
    s = summarize(torch.tensor([math.inf, math.inf, -math.inf]))
    assert (s.posinf, s.neginf, s.finite) == (2, 1, 0)
    assert s.quantile(0.0) == -math.inf and s.quantile(1.0) == math.inf
    assert math.isnan(s.mean)


# ---- StatBank ------------------------------------------------------------------------------


def test_stat_bank_accumulate_reset_summary():
    lay = Layout(5, -30, 40)
    bank = StatBank(3, lay)
    assert bank.slots == 3 and bank.bytes == 3 * (lay.width + 8) * 8
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, generator=g) for n in (100, 200_000, 7))
    bank.accumulate(a, 0)
    bank.accumulate(b.requires_grad_(), 0)  # detached inside
    bank.accumulate_many([c, a], [2, 2])
    s0 = bank.summary(0)
    check_fields(s0, np.concatenate([exact(a), exact(b.detach())]))
    assert s0.calls == 2 and s0.layout == lay
    want = summarize(a, 5, emin=-30, octaves=40) + summarize(b.detach(), 5, emin=-30, octaves=40)
    np.testing.assert_array_equal(s0.counts, want.counts)
    assert bank.summary(1) == Summary.empty(lay)
    assert bank.summary(2).calls == 2 and bank.summary(2).count == 107
    bank.reset()
    for slot in range(3):
        assert bank.summary(slot) == Summary.empty(lay)
    bank.accumulate(a, 1, histogram=False)
    s1 = bank.summary(1)
    assert s1.count == 100 and s1.hist.sum() == 0
    assert s1.mean == pytest.approx(float(a.double().mean()), rel=1e-12)


def test_stat_bank_rejects_no_slots():
    with pytest.raises(ValueError, match="slot"):
        StatBank(0)


def test_public_names():
    assert dnntrace.summarize is summarize and dnntrace.StatBank is StatBank
    assert dnntrace.Summary is Summary


def test_overflowing_sums_give_no_warning():
    """float64 data whose sums overflow: mean is inf, var and std are NaN or inf, quietly."""
    s = summarize(torch.tensor([1e308, 1e308, -1.0], dtype=torch.float64))
    assert s.sum == math.inf and s.mean == math.inf
    assert math.isnan(s.var) or s.var == math.inf
    repr(s)
