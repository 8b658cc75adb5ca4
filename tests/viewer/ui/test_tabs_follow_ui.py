"""Several traces open at once: a plain run, one with per-unit and spectral rows, and the rank
files of a distributed run. Switching runs in the page, every tab follows: Units, Spectra and
Ranks appear for the run that has their rows (drawn for that run) and go for one that does not;
the overview names the run selected; no console errors (issue #15 item 4, #16 item 3)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import panel as pn
import pytest

pytest.importorskip("torch")

from _browser import canvas_drawn, open_page, require_chromium, served, shot, wait_until  # noqa: E402
from _synthetic import write_synthetic_ranks  # noqa: E402

from dnntrace_viewer.app import SESSION_VIEWS, TABS, build_app  # noqa: E402
from dnntrace_viewer.data_store import RunStore, find_traces  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from _hostile import make_hostile_trace  # noqa: E402

pytestmark = [
    pytest.mark.ui,
    pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index"),
]


@pytest.fixture(scope="module")
def three_runs(demo_trace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_chromium()
    folder = tmp_path_factory.mktemp("follow-tabs")
    mlp = make_hostile_trace(
        folder, steps=20, nan_step=None, names=("inp", "h1", "h2", "h3", "out"),
        file_name="mlp.arrow", scalar="lr",
    )  # fmt: skip
    ranks = write_synthetic_ranks(folder / "ddp", ranks=2, steps=8, nan=None)
    pn.state.cache.pop(SESSION_VIEWS, None)
    store = RunStore(paths=[demo_trace, str(mlp), *find_traces([ranks])])
    with served(lambda: build_app(store.clone(), follow_ms=None)) as url:
        yield url
    pn.state.cache.pop(SESSION_VIEWS, None)


def _tab(pg: Any, title: str) -> Any:
    return pg.locator(".bk-tab", has_text=title)


def _select_run(pg: Any, store: RunStore, name: str) -> None:
    pg.locator(".dnt-run select").select_option(name)
    wait_until(lambda: store.run == name)


def _open(pg: Any, title: str) -> None:
    _tab(pg, title).first.click()
    wait_until(lambda: canvas_drawn(pg), timeout=60)


def test_every_tab_follows_the_run(three_runs: str, browser: Any) -> None:
    pg, errors = open_page(browser, three_runs)
    pg.wait_for_selector("canvas", timeout=60_000)
    views = wait_until(lambda: pn.state.cache.get(SESSION_VIEWS))[-1]
    store, extras = views["strips"].store, views["extras"]
    header = pg.locator(".dnt-describe h3")  # the run's name (in the pane's shadow root)
    assert store.run == "demo.arrow" and extras.titles == []

    _select_run(pg, store, "mlp.arrow")
    wait_until(lambda: "mlp.arrow" in header.inner_text())
    _tab(pg, "Units").first.wait_for(timeout=30_000)
    _tab(pg, "Spectra & dynamics").first.wait_for(timeout=30_000)
    assert _tab(pg, "Ranks").count() == 0
    _open(pg, "Units")
    units = extras.views["UnitsTab"]
    assert units._built[0] == "mlp.arrow"
    _open(pg, "Spectra & dynamics")
    assert extras.views["SpectralTab"]._built[0] == "mlp.arrow"
    shot(pg, "follow-tabs-mlp-spectra")

    _select_run(pg, store, "rank1.arrow")
    _tab(pg, "Ranks").first.wait_for(timeout=30_000)
    wait_until(lambda: _tab(pg, "Units").count() == 0 and _tab(pg, "Spectra").count() == 0)
    wait_until(lambda: "rank1.arrow" in header.inner_text())
    assert views["tabs"].active < len(TABS)  # the open tab went with its run
    _open(pg, "Ranks")
    pg.wait_for_timeout(1000)
    shot(pg, "follow-tabs-ranks")

    _select_run(pg, store, "demo.arrow")
    wait_until(lambda: _tab(pg, "Ranks").count() == 0 and extras.titles == [])

    _select_run(pg, store, "mlp.arrow")  # back: rebuilt for this run when opened again
    builds = units.builds
    _open(pg, "Units")
    wait_until(lambda: units.builds > builds)
    assert units._built == (store.run, store.version)
    _open(pg, TABS[1])
    detail = wait_until(lambda: views.get("detail"))
    assert detail.store.run == "mlp.arrow"
    pg.close()
    assert errors == [], f"browser console errors: {errors}"
