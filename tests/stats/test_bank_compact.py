"""Compact rows (header, moments, the non-zero span of each histogram) for the writer: the native
CPU pass and the device-op version used on CUDA against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dnntrace import _C
from dnntrace.stats.bank import StatBank, spans_from_nonzero
from dnntrace.storage import layout as L
from dnntrace.storage.layout import Layout


def compact_ref(counts: np.ndarray, moments: np.ndarray, rows: np.ndarray):  # type: ignore[no-untyped-def]
    header, mom, first, spans = [], [], [], []
    for r in rows:
        h = counts[r, L.HEADER :]
        nz = np.flatnonzero(h)
        lo, hi = (nz[0], nz[-1] + 1) if nz.size else (0, 0)
        header.append(counts[r, : L.HEADER])
        mom.append(moments[r])
        first.append(lo)
        spans.append(h[lo:hi])
    return header, mom, first, spans


def _bank(seed: int, slots: int, fill: list[int], scale: float) -> StatBank:
    g = torch.Generator().manual_seed(seed)
    bank = StatBank(slots, Layout(k=3, emin=-20, octaves=24))
    for slot in fill:
        n = int(torch.randint(0, 300, (1,), generator=g))
        x = torch.randn(n, generator=g) * scale
        if slot % 3 == 0:
            x = x.abs()  # one sign only
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
    first, length, nnz, biggest = bounds.numpy()
    index, count = StatBank.gather_nonzero(hist, int(nnz.sum()))
    offsets = np.concatenate([[0], np.cumsum(length)])
    spans = spans_from_nonzero(first, nnz, offsets, index.numpy(), count.numpy())
    for i in range(len(rows)):
        np.testing.assert_array_equal(header[i].numpy(), want[0][i])
        np.testing.assert_array_equal(mom[i].numpy(), want[1][i])
        assert first[i] == want[2][i]
        np.testing.assert_array_equal(spans[offsets[i] : offsets[i + 1]], want[3][i])
        assert biggest[i] == counts[rows[i], L.HEADER :].max()
        assert nnz[i] == np.count_nonzero(want[3][i])

    # the native pass, resetting the rows
    h, m, f, off, values, nonzero = _C.compact_rows(
        bank.counts.numpy(), bank.moments.numpy(), rows, True
    )
    assert nonzero == sum(np.count_nonzero(s) for s in want[3])
    for i in range(len(rows)):
        np.testing.assert_array_equal(h[i], want[0][i])
        np.testing.assert_array_equal(m[i], want[1][i])
        assert f[i] == want[2][i]
        np.testing.assert_array_equal(values[off[i] : off[i + 1]], want[3][i])
    assert values.dtype == np.uint32
    fresh = StatBank(8, bank.layout)
    torch.testing.assert_close(bank.counts[rows], fresh.counts[rows])
    torch.testing.assert_close(bank.moments[rows], fresh.moments[rows])


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
