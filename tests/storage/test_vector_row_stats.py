"""The writer's native vector-row statistics against the numpy reference ``vector_state``."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: F401  (loads libtorch before dnntrace._C)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dnntrace import _C
from dnntrace.storage import layout as L
from dnntrace.storage.layout import Layout
from dnntrace.storage.rows import vector_state

rows = st.lists(
    arrays(
        np.float32,
        st.integers(0, 40),
        elements=st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, np.inf, -np.inf])),
    ),
    max_size=6,
)


@given(rows)
def test_vector_row_stats_matches_vector_state(values: list[np.ndarray]) -> None:
    lay = Layout()
    ref_c, ref_m = vector_state(values, lay, width=L.HEADER)
    flat = np.concatenate(values) if values else np.zeros(0, np.float32)
    lengths = np.array([v.size for v in values], np.int64)
    got_c, got_m = _C.vector_row_stats(flat, lengths, L.HEADER)
    np.testing.assert_array_equal(got_c, ref_c)
    np.testing.assert_array_equal(got_m[:, [L.MIN, L.MAX]], ref_m[:, [L.MIN, L.MAX]])
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(got_m, ref_m, rtol=1e-12, atol=0)


def test_vector_row_stats_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="do not add up"):
        _C.vector_row_stats(np.ones(3, np.float32), np.array([2], np.int64), L.HEADER)
    with pytest.raises(ValueError, match="negative"):
        _C.vector_row_stats(np.ones(3, np.float32), np.array([4, -1], np.int64), L.HEADER)
    with pytest.raises(ValueError, match="header"):
        _C.vector_row_stats(np.ones(3, np.float32), np.array([3], np.int64), 2)
