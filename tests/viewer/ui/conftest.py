"""Serve the real app on 127.0.0.1 and drive Debian's Chromium through playwright."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import panel as pn
import pytest
from _browser import ARGS, CHROMIUM, open_page, require_chromium, served, wait_until  # noqa: E402,F401

from dnntrace_viewer.app import SESSION_VIEWS, build_app
from dnntrace_viewer.data_store import RunStore


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ui: drives the served app in headless Chromium")


@pytest.fixture(scope="module")
def server(demo_trace: str) -> Iterator[str]:
    require_chromium()
    pn.state.cache.pop(SESSION_VIEWS, None)
    store = RunStore(paths=[demo_trace])
    with served(lambda: build_app(store.clone(), follow_ms=None)) as url:
        yield url
    pn.state.cache.pop(SESSION_VIEWS, None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1300, "height": 1100},
        )
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.fixture()
def page(server: str, browser: Any) -> Iterator[Any]:
    """A fresh session: the page, its console errors and its views (render counters)."""
    pn.state.cache[SESSION_VIEWS] = []
    pg, errors = open_page(browser, server)
    try:
        pg.wait_for_selector("canvas", timeout=30_000)
    except Exception:  # show what the page says instead (a crashed app serves its traceback)
        pytest.fail(f"the app did not draw; the page says: {pg.inner_text('body')[:2000]}")
    views = wait_until(lambda: pn.state.cache.get(SESSION_VIEWS))[-1]
    pg.dnt_errors = errors
    pg.dnt_views = views
    yield pg
    pg.close()
    assert errors == [], f"browser console errors: {errors}"
