"""Fixtures of the distributed tests (helpers live in _dist_support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _dist_support import run_ranks


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A traced 2-rank DDP run (merged summaries, comm hook), 4 steps: its trace folder."""
    out = tmp_path_factory.mktemp("ddp")
    codes = run_ranks("ddp", out)
    assert codes == [0, 0], (out / "log.txt").read_text()[-4000:]
    return out / "trace"
