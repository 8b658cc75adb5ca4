"""Shared test setup: CUDA tests are skipped, not missing, without a GPU (their device
parameters come from tests/_devices.py), and the hypothesis profiles (``HYPOTHESIS_PROFILE=ci``
for the long run, ``dev`` by default)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None)
settings.load_profile(os.getenv("HYPOTHESIS_PROFILE", "dev"))


def _cuda_available() -> bool:
    # Imported here, not at module level, so a collection without CUDA tests never pays for torch.
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda_items = [item for item in items if item.get_closest_marker("needs_cuda")]
    if not cuda_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="CUDA not available")
    for item in cuda_items:
        item.add_marker(skip)
