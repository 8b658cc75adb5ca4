"""Browser helpers for the UI tests (a module of its own: ``from conftest import`` is ambiguous
with several conftest.py files in the tree)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
# screenshots the UI tests save for a person to look at (not compared to stored images)
SHOTS = os.environ.get("DNNTRACE_UI_SHOTS") or os.path.join(tempfile.gettempdir(), "dnntrace-ui")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    """Skip without Debian's Chromium, unless DNNTRACE_REQUIRE_UI=1 (CI), where it fails."""
    if shutil.which(CHROMIUM) is None:
        if os.environ.get("DNNTRACE_REQUIRE_UI") == "1":
            pytest.fail(f"{CHROMIUM} is missing but DNNTRACE_REQUIRE_UI=1")
        pytest.skip("Chromium not installed (apt-get install chromium chromium-driver)")


def wait_until(cond: Callable[[], Any], timeout: float = 20.0, every: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(every)


@contextlib.contextmanager
def served(make: Callable[[], Any]) -> Iterator[str]:
    """Serves ``make()`` (a Panel object per session) on a free loopback port; yields the URL,
    then stops the server and resets ``pn.state``."""
    import panel as pn

    from dnntrace_viewer.cli import free_port

    port = free_port()
    srv = pn.serve(
        {"/": make},
        port=port,
        address="127.0.0.1",
        websocket_origin=[f"127.0.0.1:{port}"],
        show=False,
        threaded=True,
        start=True,
        print_url=False,
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        with contextlib.suppress(RuntimeError):  # "Thread already stopping"
            srv.stop()
            srv.join(timeout=30)
        with contextlib.suppress(RuntimeError):
            pn.state.reset()


def watch_errors(pg: Any) -> list[str]:
    """A list that collects the page's console errors and uncaught exceptions from now on."""
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def open_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    """A new page at ``url``, with ``watch_errors`` on from before the first load."""
    pg = browser.new_page()
    errors = watch_errors(pg)
    pg.goto(url)
    return pg, errors


def shot(pg: Any, name: str) -> str:
    """Saves a screenshot of the page as ``SHOTS/name.png``; returns the path."""
    os.makedirs(SHOTS, exist_ok=True)
    path = os.path.join(SHOTS, f"{name}.png")
    pg.screenshot(path=path)
    return path


def page_pixels(pg: Any) -> np.ndarray:
    """The page's screenshot in grey levels (float64), to compare before and after an action."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(pg.screenshot())).convert("L"), dtype=np.float64)


def canvas_drawn(pg: Any, colours: int = 20) -> bool:
    """A visible canvas at least 100 px wide with more than ``colours`` distinct colours (one
    that has been painted; canvases of other tabs stay in the page, hidden)."""
    from PIL import Image

    for c in pg.query_selector_all("canvas"):
        if not c.is_visible():
            continue
        box = c.bounding_box()
        if not box or box["width"] < 100:
            continue
        img = np.asarray(Image.open(io.BytesIO(c.screenshot())).convert("RGB"))
        if len(np.unique(img.reshape(-1, 3), axis=0)) > colours:
            return True
    return False
