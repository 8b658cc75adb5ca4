"""A trace as a pandas DataFrame for assertions, shared by the capture and integration tests."""

from __future__ import annotations

from typing import Any

import pandas as pd

import dnntrace


def load_rows(path: Any) -> pd.DataFrame:
    """The trace as a DataFrame with plain string columns."""
    df = dnntrace.load(path).to_pandas()
    for c in ("phase", "module", "kind", "tensor", "dtype"):
        df[c] = df[c].astype(str)
    return df
