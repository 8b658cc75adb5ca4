"""The rank views served on 127.0.0.1 in headless Chromium: the rank x step heatmap draws, the
other tabs switch and name the NaN origin and the straggler."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import panel as pn
import pytest
from _browser import canvas_drawn, open_page, page_pixels, require_chromium, served, wait_until  # noqa: E402
from _synthetic import write_synthetic_ranks

from dnntrace_viewer.views_ranks import panels

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def ranks_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_chromium()
    folder = write_synthetic_ranks(tmp_path_factory.mktemp("ranks-ui") / "run")
    with served(lambda: pn.Tabs(*panels(folder), dynamic=False)) as url:
        yield url


def test_ranks_views_in_the_browser(ranks_server: str, browser: Any) -> None:
    pg, errors = open_page(browser, ranks_server)
    pg.wait_for_selector("canvas", timeout=60_000)
    wait_until(lambda: canvas_drawn(pg), timeout=60)  # rank x step heatmap
    before = page_pixels(pg)

    pg.get_by_text("Ranks × layers", exact=True).click()
    wait_until(lambda: canvas_drawn(pg), timeout=60)
    wait_until(lambda: np.abs(page_pixels(pg) - before).mean() > 1.0, timeout=30)

    pg.get_by_text("Stragglers & NaN", exact=True).click()
    pg.get_by_text("rank 2 at step 20").first.wait_for(timeout=30_000)
    pg.get_by_text("1 (median").first.wait_for(timeout=30_000)  # the slowest rank

    pg.get_by_text("Merged", exact=True).click()
    wait_until(lambda: canvas_drawn(pg), timeout=60)
    pg.close()
    assert errors == [], f"browser console errors: {errors}"
