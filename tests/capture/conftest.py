"""Fixtures of the tracer tests (helpers live in _capture_support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    return tmp_path / "trace.arrow"
