"""The one row merge (``dnntrace.sketch.merge``) against float64 references: counts, min and max
exact in any order and grouping, compensated sums within the error bound of compensated
summation, and the three mergers (``Summary.merge_all``, ``RankMerge``'s ``merge_ranks``,
``RunSet.merged_table``) giving the same bits on the same rows."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dnntrace.sketch import Layout, Summary, merge_rows
from dnntrace.sketch import layout as L
from dnntrace.sketch.merge import two_sum, variance
from reference import SUM, SUMSQ, tensor_summary_ref

EPS = 2.0**-52
K, EMIN, OCTAVES = 3, -20, 40  # a small layout keeps the rows short; the merge is the same
LAYOUT = Layout(K, EMIN, OCTAVES)

values = arrays(
    np.float64,
    st.integers(0, 12),
    elements=st.one_of(
        st.floats(-1e12, 1e12, allow_nan=False),
        st.floats(-1e-6, 1e-6, allow_nan=False),
        st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0]),
    ),
)


def _rows(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    rows = [tensor_summary_ref(p, K, EMIN, OCTAVES) for p in parts]
    return np.stack([c for c, _ in rows]), np.stack([m for _, m in rows])


def _sum_bound(terms: np.ndarray, ref: float) -> float:
    """Error bound of compensated summation of ``terms``: eps |S| + (n eps)^2 sum |x_i|
    (Ogita, Rump & Oishi 2005, Sum2), doubled."""
    n = max(len(terms), 2)
    return 2 * (EPS * abs(ref) + (n * EPS) ** 2 * float(np.sum(np.abs(terms))))


def _check_against_reference(c: np.ndarray, m: np.ndarray, counts, moments) -> None:
    np.testing.assert_array_equal(c, counts.sum(axis=0))
    assert m[L.MIN] == np.min(moments[:, L.MIN]) and m[L.MAX] == np.max(moments[:, L.MAX])
    for hi, lo in ((L.SUM, L.SUM_COMP), (L.SUMSQ, L.SUMSQ_COMP)):
        terms = np.concatenate([moments[:, hi], moments[:, lo]])
        if not np.all(np.isfinite(terms)):
            continue
        ref = math.fsum(terms.tolist())  # exact sum of the rows' sums, rounded once
        got = float(m[hi] + m[lo])
        assert abs(got - ref) <= _sum_bound(terms, ref), (hi, got, ref)


@given(parts=st.lists(values, min_size=1, max_size=9), data=st.data())
def test_merge_in_any_order_and_grouping_matches_the_float64_reference(parts, data):
    counts, moments = _rows(parts)
    n = len(parts)
    c, m = merge_rows(counts, moments)
    _check_against_reference(c[0], m[0], counts, moments)
    # any order
    perm = np.asarray(data.draw(st.permutations(range(n))), np.int64)
    c2, m2 = merge_rows(counts[perm], moments[perm])
    np.testing.assert_array_equal(c2, c)
    _check_against_reference(c2[0], m2[0], counts, moments)
    # any grouping: merge groups first, then the groups' results
    group = np.asarray(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), np.int64)
    cg, mg = merge_rows(counts, moments, group, 4)
    c3, m3 = merge_rows(cg, mg)
    np.testing.assert_array_equal(c3, c)
    _check_against_reference(c3[0], m3[0], counts, moments)
    # the same rows as a trace stores them (header + each histogram's non-zero buckets as
    # (bucket, count) pairs), stored last row first: a row's pairs need not follow the previous
    hdr, hist = counts[:, : L.HEADER], counts[:, L.HEADER :]
    nz = [np.flatnonzero(h) for h in hist]
    sizes = np.array([z.size for z in nz], np.int64)
    stop = np.cumsum(sizes[::-1])[::-1]
    bucket = np.concatenate([z.astype(np.uint16) for z in nz[::-1]] + [np.zeros(0, np.uint16)])
    count = np.concatenate(
        [h[z].astype(np.uint32) for h, z in zip(hist[::-1], nz[::-1], strict=True)]
        + [np.zeros(0, np.uint32)]
    )
    spans = (stop - sizes, stop, bucket, count)
    cs, ms = merge_rows(hdr, moments, group, 4, hist=spans, width=LAYOUT.width)
    np.testing.assert_array_equal(cs, cg)
    np.testing.assert_array_equal(ms, mg)
    # the merged row equals the summary of all the values together: counts bit-identical
    want, _ = tensor_summary_ref(np.concatenate(parts), K, EMIN, OCTAVES, calls=n)
    np.testing.assert_array_equal(c[0], want)


def test_compensation_keeps_what_a_plain_sum_loses():
    moments = np.zeros((3, L.NUM_MOMENTS))
    moments[:, L.SUM] = [1e16, 1.0, -1e16]
    moments[:, L.MIN], moments[:, L.MAX] = -1.0, 1.0
    counts = np.zeros((3, LAYOUT.width), np.int64)
    assert sum(moments[:, L.SUM].tolist()) == 0.0  # the plain sum loses the 1
    _, m = merge_rows(counts, moments)
    assert m[0, L.SUM] + m[0, L.SUM_COMP] == 1.0


def test_empty_groups_get_the_empty_state_and_bad_input_is_refused():
    counts = np.ones((2, LAYOUT.width), np.int64)
    moments = np.zeros((2, L.NUM_MOMENTS))
    c, m = merge_rows(counts, moments, np.array([0, 2]), 3)
    assert c[1].sum() == 0 and m[1, L.MIN] == math.inf and m[1, L.MAX] == -math.inf
    with pytest.raises(ValueError, match="group ids"):
        merge_rows(counts, moments, np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="moments"):
        merge_rows(counts, moments[:, :4])


@given(a=st.floats(-1e300, 1e300), b=st.floats(-1e300, 1e300))
def test_two_sum_is_exact(a, b):
    s, e = two_sum(np.float64(a), np.float64(b))
    if math.isfinite(float(s)):
        assert math.fsum([float(s), float(e), -a, -b]) == 0.0


@given(x=arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e6, 1e6)))
def test_header_statistics_match_numpy(x):
    n = x.size
    s, q = math.fsum(x.tolist()), math.fsum((x * x).tolist())
    summ = Summary(*tensor_summary_ref(x, K, EMIN, OCTAVES), LAYOUT)
    assert summ.mean == pytest.approx(np.mean(x), rel=1e-9, abs=1e-9)
    tol = 1e-6 * (1 + q / n)
    assert float(variance(s, q, n)) == pytest.approx(np.var(x), rel=1e-6, abs=tol)
    assert summ.var == pytest.approx(np.var(x), rel=1e-6, abs=tol)


# ---- the three mergers agree --------------------------------------------------------------
@given(
    world=st.integers(1, 4),
    labels=st.integers(1, 3),
    data=st.data(),
)
def test_rank_merge_run_set_and_summary_agree(world, labels, data):
    """Rows of ``labels`` tensors on ``world`` ranks: the cross-rank merge RankMerge computes
    (``merge_ranks`` on the gathered moments, counts added), the merge of the rank files when
    reading (``RunSet.merged_table``) and ``Summary.merge_all`` in rank order give the same
    bits."""
    from dnntrace.capture.distributed import merge_ranks
    from dnntrace.storage import TraceWriter, state_to_batch
    from dnntrace.storage.reader import rows_to_summaries
    from dnntrace.storage.runs import open_runs

    parts = [[data.draw(values) for _ in range(labels)] for _ in range(world)]
    state = [_rows(p) for p in parts]  # per rank: counts [labels, w], moments [labels, 8]
    # RankMerge: an all-reduce of the counts, the one merge over the gathered moments
    rank_counts = np.sum([c for c, _ in state], axis=0)
    rank_moments = merge_ranks([m for _, m in state])
    # Summary.merge_all over the ranks, per label
    summaries = [
        Summary.merge_all(Summary(state[r][0][i], state[r][1][i], LAYOUT) for r in range(world))
        for i in range(labels)
    ]
    # RunSet: rank files written, merged when read
    with tempfile.TemporaryDirectory() as d:
        run = os.path.join(d, "run")
        os.mkdir(run)
        for r in range(world):
            w = TraceWriter(os.path.join(run, f"rank{r}.arrow"), {"rank": r, "world_size": world})
            w.write(
                state_to_batch(
                    *state[r],
                    LAYOUT,
                    step=0,
                    module=[f"m{i}" for i in range(labels)],
                    kind=["activation"] * labels,
                    tensor=[""] * labels,
                    dtype=["float64"] * labels,
                    shape=[(len(parts[r][i]),) for i in range(labels)],
                    rank=r,
                )
            )
            w.close()
        table = open_runs(run).merged_table()
        read = rows_to_summaries(table)
        mods = table.column("module").cast("string").to_pylist()
    assert mods == [f"m{i}" for i in range(labels)]
    for i in range(labels):
        np.testing.assert_array_equal(summaries[i].counts, rank_counts[i])
        np.testing.assert_array_equal(read[i].counts, rank_counts[i])
        np.testing.assert_array_equal(summaries[i].moments, rank_moments[i])
        for got in (summaries[i], read[i]):
            # a file row holds sum + compensation, min/max NaN for "no finite value"
            want = Summary(rank_counts[i], rank_moments[i], LAYOUT)
            assert got.sum == want.sum or (math.isnan(got.sum) and math.isnan(want.sum))
            assert got.sumsq == want.sumsq or (math.isnan(got.sumsq) and math.isnan(want.sumsq))
            assert got.min == want.min or (math.isnan(got.min) and math.isnan(want.min))
            assert got.max == want.max or (math.isnan(got.max) and math.isnan(want.max))


def test_reference_fields_are_the_layout_fields():
    assert (SUM, SUMSQ) == (L.SUM, L.SUMSQ)


def test_stored_pairs_outside_the_row_are_refused() -> None:
    """A (bucket, count) pair outside the histogram would land in the next group's row."""
    hdr = np.zeros((2, L.HEADER), np.int64)
    moments = np.zeros((2, L.NUM_MOMENTS))
    for bad in (LAYOUT.bins, -1):
        pairs = (np.array([0, 1]), np.array([1, 2]), np.array([3, bad]), np.array([1, 1]))
        with pytest.raises(ValueError, match="bucket index is outside"):
            merge_rows(hdr, moments, np.array([0, 1]), 2, hist=pairs, width=LAYOUT.width)
    ok = (np.array([0, 1]), np.array([1, 2]), np.array([3, LAYOUT.bins - 1]), np.array([2, 5]))
    c, _ = merge_rows(hdr, moments, np.array([0, 0]), 1, hist=ok, width=LAYOUT.width)
    assert c[0, L.HEADER + 3] == 2 and c[0, -1] == 5 and c.sum() == 7
