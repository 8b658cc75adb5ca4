"""A trace whose names are injection payloads (tests/viewer/_hostile.py, written by the real
tracer) opened in every tab of the served viewer and in the HTML export: no payload runs (no
dialog, no call of the page's tripwire, no injected element or javascript: link), the names are
shown as text, and nothing is fetched from another host."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import panel as pn
import pytest

pytest.importorskip("torch")

from _browser import require_chromium, served, shot, wait_until, watch_errors  # noqa: E402

from dnntrace_viewer.app import SESSION_VIEWS, TABS, build_app  # noqa: E402
from dnntrace_viewer.data_store import RunStore  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from _hostile import FILE_NAME, IMG, MDLINK, PAYLOADS, SVG, make_hostile_trace  # noqa: E402

pytestmark = [
    pytest.mark.ui,
    pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index"),
]

TRIPWIRE = """
window.__pwnedCalls = [];
window.__pwned = (n) => { window.__pwnedCalls.push(n); };
"""

# every element of the page, through the shadow roots Panel renders into
INJECTED = """() => {
  const out = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      const href = (el.getAttribute('href') || '').trim().toLowerCase();
      if (el.id === 'pwned') out.push('id=pwned <' + el.tagName + '>');
      if (href.startsWith('javascript')) out.push('javascript: link');
      const data = (el.getAttribute('type') || '') === 'application/json';  // Bokeh's documents
      if (el.tagName === 'SCRIPT' && !data && el.textContent.includes('__pwned'))
        out.push('script');
      for (const a of el.getAttributeNames())
        if (a.startsWith('on') && (el.getAttribute(a) || '').includes('__pwned'))
          out.push('handler ' + a);
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return out.concat(window.__pwnedCalls.map((n) => 'called ' + n));
}"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_hostile_trace(tmp_path_factory.mktemp("hostile")))


@pytest.fixture(scope="module")
def hostile_server(hostile: str, demo_trace: str) -> Iterator[str]:
    require_chromium()
    pn.state.cache.pop(SESSION_VIEWS, None)
    store = RunStore(paths=[hostile, demo_trace])
    with served(lambda: build_app(store.clone(), follow_ms=None)) as url:
        yield url
    pn.state.cache.pop(SESSION_VIEWS, None)


def _open(browser: Any, url: str) -> tuple[Any, list[str], list[str], list[str]]:
    pg = browser.new_page()
    dialogs: list[str] = []
    foreign: list[str] = []
    pg.add_init_script(TRIPWIRE)
    errors = watch_errors(pg)
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pg.on(
        "request",
        lambda r: (
            foreign.append(r.url)
            if not r.url.startswith(("http://127.0.0.1", "file:", "data:", "blob:", "about:"))
            else None
        ),
    )
    pg.goto(url)
    return pg, errors, dialogs, foreign


def _clean(pg: Any, dialogs: list[str], where: str) -> None:
    found = pg.evaluate(INJECTED)
    assert found == [] and dialogs == [], f"{where}: injected {found}, dialogs {dialogs}"


def _hover_canvases(pg: Any) -> None:
    for c in pg.query_selector_all("canvas"):
        if c.is_visible():
            box = c.bounding_box()
            if box and box["width"] > 100:
                for fx in (0.3, 0.6):
                    pg.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * 0.5)
                    pg.wait_for_timeout(150)


def test_hostile_names_stay_text_in_every_tab(hostile_server: str, browser: Any) -> None:
    pg, errors, dialogs, foreign = _open(browser, hostile_server)
    pg.wait_for_selector("canvas", timeout=60_000)
    views = wait_until(lambda: pn.state.cache.get(SESSION_VIEWS))[-1]
    # the names are on the page as the text they are
    head = pg.locator(".dnt-describe")
    try:
        head.get_by_text(FILE_NAME).first.wait_for(timeout=30_000)
        head.get_by_text(f"module {IMG}", exact=False).first.wait_for(timeout=30_000)
    finally:
        shot(pg, "xss-overview")
    _hover_canvases(pg)
    _clean(pg, dialogs, "overview")
    extras = views["extras"]
    assert extras.titles == ["Units", "Spectra & dynamics"]
    for title in (*TABS[1:], *extras.titles):
        pg.locator(".bk-tab", has_text=title).first.click()
        pg.wait_for_timeout(1500)
        if title == TABS[3]:
            # open the overlay chooser: its options are labels from the trace
            box = pg.locator(".dnt-overlay")
            box.locator(".choices").first.click()
            box.get_by_text(SVG, exact=False).first.wait_for(timeout=30_000)
            shot(pg, "xss-overlay")
            _clean(pg, dialogs, "overlay chooser")
            pg.keyboard.press("Escape")
        if title in extras.titles:
            subtabs = {
                "Units": (
                    "Units × steps",
                    "Dead / saturated",
                    "Anomalies",
                    "Attribution",
                    "Top-k inputs",
                ),
                "Spectra & dynamics": (
                    "Spectra",
                    "Layer spectra",
                    "Update ratio",
                    "Noise & curvature",
                    "Landscape",
                ),
            }[title]
            for sub in subtabs:
                pg.locator(".bk-tab", has_text=sub).first.click()
                pg.wait_for_timeout(1200)
                _hover_canvases(pg)
                _clean(pg, dialogs, f"{title} / {sub}")
        _hover_canvases(pg)
        _clean(pg, dialogs, title)
    # the anomaly timeline names the hostile layer as text
    pg.locator(".bk-tab", has_text="Units").first.click()
    pg.locator(".bk-tab", has_text="Anomalies").first.click()
    pg.locator(".dnt-anomaly").get_by_text(IMG, exact=False).first.wait_for(timeout=30_000)
    shot(pg, "xss-anomalies")
    _clean(pg, dialogs, "anomalies")
    # every module in the Module select, by its name
    for name in PAYLOADS:
        assert views["strips"].store.param.module.objects.count(name) == 1
    pg.close()
    assert foreign == [], f"fetched from other hosts: {foreign}"
    assert errors == [], f"browser console errors: {errors}"


def test_hostile_html_export(hostile: str, browser: Any, tmp_path: Path) -> None:
    from dnntrace_viewer.cli import main

    out = tmp_path / "report.html"
    assert main([hostile, "--export", str(out), "--no-cache"]) == 0
    html = out.read_text()
    assert MDLINK not in html or "javascript:" not in html.split(MDLINK)[0][-20:]
    pg, errors, dialogs, foreign = _open(browser, out.as_uri())
    pg.wait_for_timeout(3000)
    pg.get_by_text(FILE_NAME).first.wait_for(timeout=30_000)
    _clean(pg, dialogs, "html export")
    pg.close()
    assert foreign == [], f"the export fetched from other hosts: {foreign}"
