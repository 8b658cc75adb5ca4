"""Compact rows (header, moments, the non-zero buckets of each histogram as (bucket, count) pairs)
for the writer: the native CPU pass and the device-op version used on CUDA against a numpy
reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dnntrace import _C
from dnntrace.stats.bank import StatBank
from dnntrace.storage import layout as L
from dnntrace.storage.layout import Layout


def compact_ref(counts: np.ndarray, moments: np.ndarray, rows: np.ndarray):  # type: ignore[no-untyped-def]
    header, mom, buckets, values = [], [], [], []
    for r in rows:
        h = counts[r, L.HEADER :]
        nz = np.flatnonzero(h)
        header.append(counts[r, : L.HEADER])
        mom.append(moments[r])
        buckets.append(nz)
        values.append(h[nz])
    return header, mom, buckets, values


_SPECIALS = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30])


def _bank(seed: int, slots: int, fill: list[int], scale: float) -> StatBank:
    g = torch.Generator().manual_seed(seed)
    bank = StatBank(slots, Layout(k=3, emin=-20, octaves=24))
    for slot in fill:
        n = int(torch.randint(0, 300, (1,), generator=g))
        x = torch.randn(n, generator=g) * scale
        if slot % 3 == 0:
            x = x.abs()  # one sign only
        if slot % 4 == 1:  # zeros, NaN, Inf, underflow
            pick = torch.randint(0, len(_SPECIALS), (int(n > 0) * 5,), generator=g)
            x = torch.cat([x, _SPECIALS[pick]])
        if slot % 5 == 2:
            x = -x.abs()  # negative only
        bank.accumulate(x, slot)
    return bank


@given(
    seed=st.integers(0, 2**16),
    fill=st.lists(st.integers(0, 7), max_size=12),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
)
def test_compact_rows_match_reference(seed: int, fill: list[int], scale: float) -> None:
    bank = _bank(seed, 8, fill, scale)
    rows = np.array(sorted(set(fill) | {7}), np.int64)  # 7 may be unused: an empty row
    counts, moments = bank.counts.numpy().copy(), bank.moments.numpy().copy()
    want = compact_ref(counts, moments, rows)

    # the device-op version (the CUDA writer's), run on the CPU
    idx = torch.from_numpy(rows)
    header, mom, bounds, hist = bank.compact_bounds(idx)
    nnz, biggest = bounds.numpy()
    index, count = StatBank.gather_nonzero(hist, int(nnz.sum()))
    index, count = index.numpy().view(np.uint16), count.numpy().view(np.uint32)
    offsets = np.concatenate([[0], np.cumsum(nnz)])
    for i in range(len(rows)):
        np.testing.assert_array_equal(header[i].numpy(), want[0][i])
        np.testing.assert_array_equal(mom[i].numpy(), want[1][i])
        np.testing.assert_array_equal(index[offsets[i] : offsets[i + 1]], want[2][i])
        np.testing.assert_array_equal(count[offsets[i] : offsets[i + 1]], want[3][i])
        assert biggest[i] == counts[rows[i], L.HEADER :].max()

    # the native pass, scanning and (the writer's) bounded by each row's header and min/max,
    # resetting the rows
    lay = bank.layout
    for hint in (None, (lay.k, lay.emin, lay.octaves)):
        b = StatBank(8, lay)
        b.counts.copy_(torch.from_numpy(counts))
        b.moments.copy_(torch.from_numpy(moments))
        _check_native(b, rows, want, hint)


def _check_native(bank: StatBank, rows: np.ndarray, want, hint) -> None:  # type: ignore[no-untyped-def]
    h, m, off, index, values, room, scanned = _C.compact_rows(
        bank.counts.numpy(), bank.moments.numpy(), rows, True, hint
    )
    assert len(values) == len(index) == off[-1] == sum(len(b) for b in want[2])
    assert room >= off[-1] and scanned >= off[-1]
    for i in range(len(rows)):
        np.testing.assert_array_equal(h[i], want[0][i])
        np.testing.assert_array_equal(m[i], want[1][i])
        np.testing.assert_array_equal(index[off[i] : off[i + 1]], want[2][i])
        np.testing.assert_array_equal(values[off[i] : off[i + 1]], want[3][i])
    assert values.dtype == np.uint32 and index.dtype == np.uint16
    fresh = StatBank(8, bank.layout)
    torch.testing.assert_close(bank.counts, fresh.counts)  # every used row reset, no bucket left
    torch.testing.assert_close(bank.moments[rows], fresh.moments[rows])


@given(
    seed=st.integers(0, 2**16),
    fill=st.lists(st.integers(0, 7), min_size=1, max_size=12),
    bad=st.lists(st.integers(0, 7), min_size=1, max_size=3),
    how=st.sampled_from(["narrow", "nan", "swap"]),
)
def test_moments_that_do_not_bound_the_histogram_cost_a_rescan_not_a_bucket(
    seed: int, fill: list[int], bad: list[int], how: str
) -> None:
    """The writer bounds spans by min/max; rows whose min/max miss buckets (never written by the
    kernels, planted here) are rescanned from the first such row: the same output as a scan."""
    bank = _bank(seed, 8, fill, 1.0)
    rows = np.array(sorted(set(fill) | set(bad)), np.int64)
    for r in bad:
        mo = bank.moments[r]
        if how == "narrow":  # a min/max inside the data's range
            mid = float(bank.moments[r, L.MIN] + bank.moments[r, L.MAX]) / 2
            mo[L.MIN] = mo[L.MAX] = mid if np.isfinite(mid) else 0.5
        elif how == "nan":
            mo[L.MIN] = float("nan")
        else:
            mo[L.MIN], mo[L.MAX] = 1.0, -1.0
    counts, moments = bank.counts.numpy().copy(), bank.moments.numpy().copy()
    _check_native(bank, rows, compact_ref(counts, moments, rows), (3, -20, 24))


def test_compact_rows_refuses_a_bucket_over_uint32_and_resets_nothing() -> None:
    bank = StatBank(2, Layout(k=2, emin=-4, octaves=4))
    bank.counts[1, L.HEADER + 5] = 2**32
    bank.counts[1, L.CALLS] = 1
    before = bank.counts.clone()
    with pytest.raises(OverflowError, match="2\\*\\*32"):
        _C.compact_rows(bank.counts.numpy(), bank.moments.numpy(), np.array([0, 1]), True)
    assert torch.equal(bank.counts, before)
    with pytest.raises(IndexError):
        _C.compact_rows(bank.counts.numpy(), bank.moments.numpy(), np.array([2]), False)


def _inner_ref(buckets: np.ndarray, per_sign: int) -> tuple[int, int]:
    """Where a row's data is: one past its last negative bucket (0 without one), its first
    positive bucket (2 * per_sign without one); (-1, -1) for an empty histogram."""
    if buckets.size == 0:
        return -1, -1
    neg, pos = buckets[buckets < per_sign], buckets[buckets >= per_sign]
    return (int(neg[-1]) + 1 if neg.size else 0), (int(pos[0]) if pos.size else 2 * per_sign)


@given(
    seed=st.integers(0, 2**16),
    fill=st.lists(st.integers(0, 7), min_size=1, max_size=12),
    guess=st.lists(st.tuples(st.integers(-1, 400), st.integers(-1, 400)), min_size=8, max_size=8),
    slots=st.integers(0, 8),
)
def test_a_predicted_gap_skips_reads_never_buckets(
    seed: int, fill: list[int], guess: list[tuple[int, int]], slots: int
) -> None:
    """The compaction skips the buckets between a row's signs where its last compaction found
    none (`inner`); any prediction, right or wrong (here arbitrary), gives the reference's
    pairs, and `inner` is updated to where each row's data is (rows beyond it: untouched)."""
    bank = _bank(seed, 8, fill, 1.0)
    lay = bank.layout
    rows = np.array(sorted(set(fill)), np.int64)
    counts, moments = bank.counts.numpy().copy(), bank.moments.numpy().copy()
    want = compact_ref(counts, moments, rows)
    inner = np.array(guess[:slots], np.int32).reshape(slots, 2)
    before = inner.copy()
    h, m, off, index, values, room, scanned = _C.compact_rows(
        bank.counts.numpy(), bank.moments.numpy(), rows, True, (lay.k, lay.emin, lay.octaves),
        inner=inner,
    )  # fmt: skip
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(h[i], want[0][i])
        np.testing.assert_array_equal(index[off[i] : off[i + 1]], want[2][i])
        np.testing.assert_array_equal(values[off[i] : off[i + 1]], want[3][i])
        if r < slots:
            assert tuple(inner[r]) == _inner_ref(want[2][i], lay.per_sign)
    untouched = [r for r in range(slots) if r not in set(rows.tolist())]
    np.testing.assert_array_equal(inner[untouched], before[untouched])
    torch.testing.assert_close(bank.counts, StatBank(8, lay).counts)  # every used row reset


def test_a_right_prediction_reads_less() -> None:
    """Symmetric data twice in one bank row: the second compaction skips the empty buckets
    between the signs that the first found (and reads fewer buckets), with the same pairs."""
    lay = Layout(k=6, emin=-48, octaves=64)
    bank = StatBank(2, lay)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 0.02
    inner = np.full((2, 2), -1, np.int32)
    got = []
    for _ in range(2):
        bank.accumulate(x, 1)
        _, _, off, index, values, room, scanned = _C.compact_rows(
            bank.counts.numpy(), bank.moments.numpy(), np.array([1]), True,
            (lay.k, lay.emin, lay.octaves), inner=inner,
        )  # fmt: skip
        got.append((index.copy(), values.copy(), room, scanned))
    (i1, v1, room1, read1), (i2, v2, room2, read2) = got
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(v1, v2)
    assert read1 == room1 == room2  # the first reads the whole span from min to max
    gap = int(inner[1, 1]) - int(inner[1, 0]) - 2 * (6 << lay.k)  # what the second can skip
    assert gap > 1000 and read2 == room2 - gap
