"""Traces as pandas DataFrames for assertions, shared by the capture and integration tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

import dnntrace


def load_rows(path: Any) -> pd.DataFrame:
    """The trace as a DataFrame with plain string columns."""
    df = dnntrace.load(path).to_pandas()
    for c in ("phase", "module", "kind", "tensor", "dtype"):
        df[c] = df[c].astype(str)
    return df


ROW_KEY = ["step", "module", "kind", "tensor"]


def load_two_ranks(folder: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of ``folder/rank0.arrow`` and ``folder/rank1.arrow`` (asserting that these two
    are the folder's only files), each sorted by step, module, kind and tensor."""
    files = sorted(p.name for p in Path(folder).iterdir())
    assert files == ["rank0.arrow", "rank1.arrow"], files
    r0, r1 = (load_rows(Path(folder) / f).sort_values(ROW_KEY) for f in files)
    return r0.reset_index(drop=True), r1.reset_index(drop=True)


def kind_rows(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The rows of one kind, renumbered from 0 (so two ranks' rows compare by position)."""
    return df[df["kind"] == kind].reset_index(drop=True)
