"""Device parametrisation shared by tests (a module of its own: several folders have a
conftest.py, so ``from conftest import ...`` would pick whichever was imported last)."""

from __future__ import annotations

import pytest


def cpu_and_cuda() -> tuple[object, ...]:
    """Device parameters for a test that runs on the CPU and, where there is one, on CUDA."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))
