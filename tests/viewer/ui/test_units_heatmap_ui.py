"""A synthetic per-unit trace (big enough for the on-disk ``.units`` cache) served on 127.0.0.1
in headless Chromium: the units × steps heatmap and the dead map paint, and a wheel zoom
re-renders the heatmap from the pyramid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import panel as pn
import pytest
from _browser import canvas_drawn, open_page, page_pixels, require_chromium, served, wait_until
from _synthetic import UnitsSpec, write_synthetic_units

from dnntrace_viewer.units_data import MIN_CACHE_CELLS, UnitData, cache_dir
from dnntrace_viewer.views_units import UnitHeatmap, _matrix_source, dead_view

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def units_trace(tmp_path_factory: pytest.TempPathFactory) -> str:
    spec = UnitsSpec(units=4000, steps=300, seed=3)
    assert spec.cells >= MIN_CACHE_CELLS  # the memory-mapped path, not the in-memory one
    path = tmp_path_factory.mktemp("units-heat") / "u.arrow"
    write_synthetic_units(path, spec)
    return str(path)


@pytest.fixture(scope="module")
def heat_server(units_trace: str) -> Iterator[tuple[str, list[UnitHeatmap]]]:
    require_chromium()
    sessions: list[UnitHeatmap] = []

    def make() -> Any:
        data = UnitData.open(units_trace)
        heat = UnitHeatmap(_matrix_source(data), ["hidden_act"], ["unit_mean", "unit_firing"])
        sessions.append(heat)
        return pn.Tabs(("Units × steps", heat.panel()), ("Dead / saturated", dead_view(data)))

    with served(make) as url:
        yield url, sessions


def test_units_heatmap_paints_and_zooms(
    heat_server: tuple[str, list[UnitHeatmap]], browser: Any, units_trace: str
) -> None:
    url, sessions = heat_server
    pg, errors = open_page(browser, url)
    pg.wait_for_selector("canvas", timeout=60_000)
    wait_until(lambda: canvas_drawn(pg), timeout=60)
    assert Path(cache_dir(units_trace)).is_dir()  # built on disk beside the trace
    heat = sessions[-1]
    canvas = pg.locator(".dnt-units-heat canvas").first
    before = page_pixels(pg)
    renders = heat.renders
    box = canvas.bounding_box()
    pg.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5)
    pg.mouse.wheel(0, -600)
    pg.mouse.move(5, 5)
    wait_until(lambda: heat.renders > renders, timeout=30)
    wait_until(lambda: np.abs(page_pixels(pg) - before).mean() > 0.5, timeout=30)
    wait_until(lambda: canvas_drawn(pg), timeout=30)

    pg.locator(".bk-tab", has_text="Dead / saturated").click()
    pg.get_by_text("at the last step: [").first.wait_for(timeout=30_000)
    wait_until(lambda: canvas_drawn(pg), timeout=60)  # the dead map and the fraction curve
    pg.close()
    assert errors == [], f"browser console errors: {errors}"
