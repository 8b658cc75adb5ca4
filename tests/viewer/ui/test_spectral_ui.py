"""The spectral tabs served on 127.0.0.1 in headless Chromium: the ESD plot draws and animates,
every tab draws, the landscape player moves the trajectory point, no console errors."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import panel as pn
import pytest

pytest.importorskip("torch")

from _browser import open_page, require_chromium, served, wait_until  # noqa: E402

from dnntrace_viewer.views_spectral import panels  # noqa: E402

pytestmark = pytest.mark.ui
SHOTS = os.environ.get("DNNTRACE_UI_SHOTS")  # a folder to keep the screenshots in


@pytest.fixture(scope="module")
def spectral_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_chromium()
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from test_spectral_views import make_spectral_trace

    path = make_spectral_trace(tmp_path_factory.mktemp("spectral-ui") / "run.arrow")
    with served(lambda: pn.Tabs(*panels(str(path)), dynamic=False)) as url:
        yield url


def _shot(pg: Any, name: str) -> np.ndarray:
    from PIL import Image

    png = pg.screenshot(full_page=True)
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        Path(SHOTS, f"{name}.png").write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def _drawn_canvases(pg: Any) -> int:
    from PIL import Image

    n = 0
    for c in pg.query_selector_all("canvas"):
        box = c.bounding_box()
        if not box or box["width"] < 100 or not c.is_visible():
            continue
        img = np.asarray(Image.open(io.BytesIO(c.screenshot())).convert("RGB"))
        if len(np.unique(img.reshape(-1, 3), axis=0)) > 20:
            n += 1
    return n


def test_spectral_tabs_in_the_browser(spectral_server: str, browser: Any) -> None:
    pg, errors = open_page(browser, spectral_server)
    pg.wait_for_selector("canvas", timeout=60_000)
    wait_until(lambda: _drawn_canvases(pg) >= 3, timeout=60)  # ESD, alpha, stable rank
    first = _shot(pg, "spectra")

    # the player steps the ESD back in time: the plot changes
    select = pg.locator("select").first
    options = select.locator("option").all_inner_texts()
    assert options == ["0.weight", "2.weight", "4.weight"]
    # the view opens on the first layer with a power-law fit: switch to another one
    shown = select.evaluate("s => s.options[s.selectedIndex].text")
    select.select_option(next(o for o in options if o != shown))
    wait_until(lambda: np.abs(_shot(pg, "spectra-layer2") - first).mean() > 0.5, 30)

    for tab, want in (
        ("Layer spectra", 2),
        ("Update ratio", 2),
        ("Noise & curvature", 2),
        ("Landscape", 1),
    ):
        pg.get_by_text(tab, exact=True).click()
        wait_until(lambda want=want: _drawn_canvases(pg) >= want, timeout=60)
        _shot(pg, tab.replace(" ", "_").replace("&", "and"))

    # landscape: move the player to its start, the trajectory point moves
    before = _shot(pg, "landscape-end")
    slider = pg.locator("input[type=range]").last
    slider.evaluate(
        "(el) => { el.value = el.min; el.dispatchEvent(new Event('input')); "
        "el.dispatchEvent(new Event('change')); }"
    )
    wait_until(lambda: np.abs(_shot(pg, "landscape-start") - before).mean() > 0.05, 30)
    pg.close()
    assert errors == [], f"browser console errors: {errors}"
