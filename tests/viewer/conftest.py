"""Shared synthetic traces for the viewer tests (small: a few MB, built once per session)."""

from __future__ import annotations

import pytest
from _synthetic import SyntheticSpec, write_synthetic

SPEC = SyntheticSpec(
    steps=40,
    layers=4,
    width=16,
    batch=8,
    nan_step=30,
    nan_layer=2,
    dead_layer=2,
    frozen_layer=0,
    steps_per_batch=10,
)


@pytest.fixture(scope="session")
def spec() -> SyntheticSpec:
    return SPEC


@pytest.fixture(scope="session")
def demo_trace(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("trace") / "demo.arrow"
    write_synthetic(path, SPEC)
    return str(path)


@pytest.fixture(scope="session")
def clean_trace(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A healthy run: no NaN, no dead or frozen layer, gently scaled gradients."""
    path = tmp_path_factory.mktemp("clean") / "clean.arrow"
    spec = SyntheticSpec(
        steps=12,
        layers=2,
        width=16,
        batch=8,
        nan_step=None,
        dead_layer=None,
        frozen_layer=None,
        steps_per_batch=6,
    )
    write_synthetic(path, spec)
    return str(path)
