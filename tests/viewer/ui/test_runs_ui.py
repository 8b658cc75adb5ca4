"""Two traces open at once (as ``make demo``): the tabs follow the Run selector (Units and
Spectra appear for the trace that has their rows, and go for the one that does not), the health
table's selection does not survive a switch, the Module select names the root; screenshots of
the per-unit and spectral tabs are saved for a person to look at (``_browser.SHOTS``)."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import colorcet as cc
import numpy as np
import panel as pn
import pytest
from bokeh.models import Legend
from PIL import Image

pytest.importorskip("torch")

from _browser import canvas_drawn, open_page, require_chromium, served, shot, wait_until  # noqa: E402

from dnntrace_viewer.app import SESSION_VIEWS, TABS, build_app  # noqa: E402
from dnntrace_viewer.data_store import RunStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from _hostile import make_hostile_trace  # noqa: E402

pytestmark = [
    pytest.mark.ui,
    pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index"),
]

BMY = [np.array([int(c[i : i + 2], 16) for i in (1, 3, 5)]) for c in (cc.bmy[0], cc.bmy[-1])]
NAMES = ("input", "hidden1", "hidden2", "hidden3", "output")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = make_hostile_trace(
        tmp_path_factory.mktemp("mlp"),
        steps=30,
        nan_step=None,
        names=NAMES,
        file_name="mlp.arrow",
        scalar="lr",
    )
    return str(path)


@pytest.fixture(scope="module")
def two_runs(demo_trace: str, mlp: str) -> Iterator[str]:
    require_chromium()
    pn.state.cache.pop(SESSION_VIEWS, None)
    store = RunStore(paths=[demo_trace, mlp])
    with served(lambda: build_app(store.clone(), follow_ms=None)) as url:
        yield url
    pn.state.cache.pop(SESSION_VIEWS, None)


def near(img: np.ndarray, rgb: np.ndarray) -> int:
    """Pixels within 24 of ``rgb`` in every channel."""
    return int((np.abs(img.astype(int) - rgb).max(axis=-1) <= 24).sum())


def tab(pg: Any, title: str) -> Any:
    return pg.locator(".bk-tab", has_text=title)


def test_tabs_follow_the_run_selector(two_runs: str, browser: Any) -> None:
    pg, errors = open_page(browser, two_runs)
    pg.wait_for_selector("canvas", timeout=60_000)
    views = wait_until(lambda: pn.state.cache.get(SESSION_VIEWS))[-1]
    store = views["strips"].store
    assert store.run == "demo.arrow" and views["extras"].titles == []
    assert tab(pg, "Units").count() == 0
    # select a row of the health table, then switch runs: the selection goes
    pg.locator(".tabulator-cell", has_text="act0").first.click()
    wait_until(lambda: views["health"].selection == [2] or views["health"].selection)
    pg.locator(".bk-tab", has_text=TABS[0]).first.click()
    pg.locator(".dnt-run select").select_option("mlp.arrow")
    wait_until(lambda: store.run == "mlp.arrow")
    wait_until(lambda: views["health"].selection == [])
    tab(pg, "Units").first.wait_for(timeout=30_000)
    tab(pg, "Spectra & dynamics").first.wait_for(timeout=30_000)
    # the Module select shows the selected module by name (the root as <root>)
    store.module = ""
    wait_until(lambda: pg.locator(".dnt-module select").evaluate(
        "s => s.options[s.selectedIndex].text") == "<root>")  # fmt: skip
    shot(pg, "runs-overview-mlp")
    for outer, inner in (
        ("Units", ("Units × steps", "Dead / saturated", "Anomalies", "Attribution")),
        ("Spectra & dynamics", ("Spectra", "Layer spectra", "Update ratio")),
    ):
        tab(pg, outer).first.click()
        for sub in inner:
            tab(pg, sub).first.click()
            wait_until(lambda: canvas_drawn(pg), timeout=60)
            pg.wait_for_timeout(1500)
            shot(pg, f"runs-{outer.split()[0].lower()}-{sub.split()[0].lower()}")
            if sub == "Dead / saturated":
                # no unit is dead: the 0/1 map is drawn in the scale's 0 colour, not its top
                heat = pg.locator(".dnt-units-heat:visible canvas").first
                img = np.asarray(Image.open(io.BytesIO(heat.screenshot())).convert("RGB"))
                # (the colour bar holds a few hundred top-colour pixels; a solid map 10^5)
                assert near(img, BMY[0]) > 50_000 and near(img, BMY[-1]) < 5_000
            if sub == "Spectra":
                assert pg.get_by_text("α = nan").count() == 0
    # back to the trace without those rows: its tabs go, the page shows the overview
    pg.locator(".dnt-run select").select_option("demo.arrow")
    wait_until(lambda: views["extras"].titles == [])
    wait_until(lambda: tab(pg, "Units").count() == 0)
    assert views["tabs"].active < len(TABS)
    tab(pg, TABS[3]).first.click()
    wait_until(lambda: canvas_drawn(pg), timeout=60)
    pg.wait_for_timeout(1000)
    shot(pg, "runs-distribution")
    # the Player's loop controls sit above the plot, and the legend beside it, not over it
    reflect = pg.get_by_text("Reflect").first.bounding_box()
    plot = pg.locator(".dnt-dist canvas").first.bounding_box()
    assert reflect["y"] + reflect["height"] <= plot["y"]
    fig = views["dist"].fig
    assert any(isinstance(r, Legend) for r in fig.right)
    assert not any(isinstance(r, Legend) for r in fig.center)
    pg.close()
    assert errors == [], f"browser console errors: {errors}"
