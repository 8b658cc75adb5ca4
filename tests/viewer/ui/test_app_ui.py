"""The served app in a real browser: it draws, zoom re-renders, selection opens the detail,
the Player animates, the heatmap draws; no console errors (checked by the ``page`` fixture)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from _browser import wait_until  # noqa: E402
from PIL import Image

pytestmark = [
    pytest.mark.ui,
    # bokeh 3.9.2 ColumnDataSource.from_df (behind Panel's Tabulator) calls
    # DataFrame.reset_index(inplace=True), deprecated in pandas 3.1 (Pandas4Warning)
    pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index"),
]


def pixels(locator: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)


def colourful(img: np.ndarray) -> int:
    """Distinct colours in the image: a blank or single-colour plot has a handful."""
    return len(np.unique(img.reshape(-1, 3)[::3], axis=0))


def has_colour(img: np.ndarray, rgb: tuple[int, int, int], n: int = 30) -> bool:
    """At least ``n`` pixels within 12 of ``rgb`` in every channel."""
    return int((np.abs(img - np.array(rgb)).max(axis=-1) <= 12).sum()) >= n


def changed(a: np.ndarray, b: np.ndarray) -> int:
    """Summed pixel difference over the common area (a re-render may change the axis width)."""
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    return int(np.abs(a[:h, :w] - b[:h, :w]).sum())


def plot(page: Any, name: str) -> Any:
    """The pane of a view (css class dnt-<name>), once it holds a visible canvas."""
    loc = page.locator(f".dnt-{name}")
    loc.locator("canvas").first.wait_for(state="visible", timeout=30_000)
    return loc


def test_overview_draws(page: Any) -> None:
    assert page.get_by_text("first NaN/Inf: step 30").count() == 1
    assert page.get_by_text("vanishing frozen").count() >= 1  # fc0's flags in the table
    strips = page.dnt_views["strips"]
    assert strips.renders >= 1
    canvas = plot(page, "strips")
    wait_until(lambda: colourful(pixels(canvas)) > 50)


def test_health_table_fits_its_rows(page: Any) -> None:
    """Every row of a small model's table in view, with no empty band under the last one."""
    table = page.locator(".dnt-health")
    rows = page.locator(".dnt-health .tabulator-row")
    wait_until(lambda: rows.count() == len(page.dnt_views["strips"].store.current.health()))
    box = table.bounding_box()
    last = rows.nth(rows.count() - 1).bounding_box()
    gap = box["y"] + box["height"] - (last["y"] + last["height"])
    assert 0 <= gap < last["height"], f"{gap:.0f} px between the last row and the table's end"


def test_select_module_opens_detail(page: Any) -> None:
    views = page.dnt_views
    page.get_by_text("Histogram over time", exact=True).click()
    detail = wait_until(lambda: views.get("detail"))  # built when its tab first opens
    canvas = plot(page, "detail")
    wait_until(lambda: colourful(pixels(canvas)) > 50)
    before = pixels(canvas)
    page.get_by_text("Overview", exact=True).click()
    n = detail.renders
    page.locator(".tabulator-cell", has_text="act0").first.click()
    wait_until(lambda: detail.store.module == "act0" and views["tabs"].active == 1)
    wait_until(lambda: detail.renders > n)
    wait_until(
        lambda: pixels(canvas).shape == before.shape and changed(pixels(canvas), before) > 10_000
    )


def test_zoom_re_renders(page: Any) -> None:
    page.get_by_text("Histogram over time", exact=True).click()
    detail = wait_until(lambda: page.dnt_views.get("detail"))
    canvas = plot(page, "detail")
    wait_until(lambda: colourful(pixels(canvas)) > 50)
    before = pixels(canvas)
    n = detail.renders
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5)
    for _ in range(3):
        page.mouse.wheel(0, -400)
    wait_until(lambda: detail.renders > n)
    xr = (detail.x_range.start, detail.x_range.end)
    assert xr[1] - xr[0] < 40  # zoomed in from 40 steps
    wait_until(lambda: changed(pixels(canvas), before) > 10_000)


def test_player_animates(page: Any) -> None:
    page.get_by_text("Distribution at a step", exact=True).click()
    dist = wait_until(lambda: page.dnt_views.get("dist"))
    label = page.locator(".dnt-step b")  # the text lives in the pane's shadow root
    wait_until(lambda: "step 0" in label.inner_text())
    canvas = plot(page, "dist")
    # the overlaid layers' lines are drawn (Category10 blue, orange, green)
    for rgb in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        wait_until(lambda rgb=rgb: has_colour(pixels(canvas), rgb))
    before = pixels(canvas)
    frames = dist.frames
    page.locator("button.play").first.click()
    wait_until(lambda: dist.frames >= frames + 3, timeout=30)
    wait_until(lambda: "step 0" not in label.inner_text())
    assert dist.store.step > 0
    wait_until(lambda: changed(pixels(canvas), before) > 1_000)


def test_heatmap_draws(page: Any) -> None:
    page.get_by_text("Layer × step", exact=True).click()
    wait_until(lambda: page.dnt_views.get("heat"), timeout=40)
    canvas = plot(page, "heat")
    wait_until(lambda: colourful(pixels(canvas)) > 20, timeout=40)
