"""The per-unit views served on 127.0.0.1 in headless Chromium: heatmaps draw, tabs switch, the
anomaly timeline names the planted layer, the top-k table follows the selected unit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import panel as pn
import pytest

pytest.importorskip("torch")

from _browser import canvas_drawn, open_page, page_pixels, require_chromium, served, wait_until  # noqa: E402

from dnntrace_viewer.views_units import panels  # noqa: E402

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def units_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_chromium()
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from test_units_views import make_units_trace

    path = make_units_trace(tmp_path_factory.mktemp("units-ui") / "t.arrow")
    with served(lambda: pn.Tabs(*panels(str(path)), dynamic=False, name="unit_tabs")) as url:
        yield url


def test_units_views_in_the_browser(units_server: str, browser: Any) -> None:
    pg, errors = open_page(browser, units_server)
    pg.wait_for_selector("canvas", timeout=60_000)
    wait_until(lambda: canvas_drawn(pg), timeout=60)  # the units x steps heatmap
    before = page_pixels(pg)

    pg.locator(".bk-tab", has_text="Dead / saturated").click()
    # Panel renders inside shadow roots: locators pierce them, body.innerText does not
    pg.get_by_text("at the last step: [1, 5, 9]").first.wait_for(timeout=30_000)
    wait_until(lambda: canvas_drawn(pg), timeout=60)
    assert np.abs(page_pixels(pg) - before).mean() > 1.0  # the page changed

    pg.locator(".bk-tab", has_text="Anomalies").click()
    pg.get_by_text("step 5: 2 (forward, execution order)").first.wait_for(timeout=30_000)

    pg.locator(".bk-tab", has_text="Top-k inputs").click()
    table = pg.locator("table").last
    table.wait_for(timeout=30_000)
    first = table.inner_text()
    box = pg.locator("input").last
    box.fill("3")
    box.press("Enter")
    wait_until(lambda: pg.locator("table").last.inner_text() != first, 30)
    assert pg.locator("table").last.locator("tbody tr").count() == 3

    pg.locator(".bk-tab", has_text="Attribution").click()
    wait_until(lambda: canvas_drawn(pg), timeout=60)
    pg.close()
    assert errors == [], f"browser console errors: {errors}"
