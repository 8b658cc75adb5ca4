"""``--follow``: a trace written while the viewer follows it for two minutes (set
DNNTRACE_FOLLOW_SECONDS to change). Every plot keeps up (the loss and learning-rate curves,
the strips, the detail, the heatmap, the distribution's step range) and the page logs no
error (the old page threw "reference ... isn't known" and froze the scalar curves)."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import panel as pn
import pytest
from _browser import open_page, require_chromium, served, shot, wait_until
from _synthetic import SyntheticSpec, write_synthetic
from PIL import Image

from dnntrace.storage import TraceWriter, load
from dnntrace_viewer.app import SESSION_VIEWS, TABS, build_app
from dnntrace_viewer.data_store import RunStore

pytestmark = [
    pytest.mark.ui,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.reset_index"),
]

SECONDS = float(os.environ.get("DNNTRACE_FOLLOW_SECONDS", "120"))


class Growing:
    """Writes a trace batch by batch (the real writer), one batch every ``every`` seconds."""

    def __init__(self, src: str, dst: Path, every: float) -> None:
        tr = load(src)
        meta = {k: v for k, v in tr.metadata.items() if k != "schema_version"}
        self.batches = [b for b in tr.table.to_batches() if b.num_rows]
        self.writer = TraceWriter(dst, meta)
        self.every = every
        self.written = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        for _ in range(2):
            self.write_next()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def write_next(self) -> bool:
        with self.lock:
            if self.written >= len(self.batches):
                return False
            self.writer.write(self.batches[self.written])
            self.written += 1
            return True

    RESERVE = 12  # batches the background thread leaves for the test to write on cue

    def run(self) -> None:
        while not self.stop.wait(self.every) and self.written < len(self.batches) - self.RESERVE:
            self.write_next()


@pytest.fixture(scope="module")
def growing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Growing]:
    d = tmp_path_factory.mktemp("follow")
    src = d / "full.arrow"
    write_synthetic(
        src,
        SyntheticSpec(steps=160, layers=3, width=16, batch=8, nan_step=None, steps_per_batch=2),
    )
    g = Growing(str(src), d / "live.arrow", every=1.0)
    g.every = max(SECONDS / (len(g.batches) - 12), 0.2)  # writing until the last tab
    yield g
    g.stop.set()
    g.writer.close()


def scalar_steps(views: dict[str, Any]) -> int:
    srcs = views["scalars"]._sources
    return int(
        max((s.data["step"].max() for s in srcs.values() if len(s.data["step"])), default=-1)
    )


def pixels(loc: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(loc.screenshot())).convert("L"), dtype=float)


def test_follow_updates_every_plot(growing: Growing, browser: Any) -> None:
    require_chromium()
    pn.state.cache.pop(SESSION_VIEWS, None)
    store = RunStore(paths=[growing.writer.path], follow=True)
    with served(lambda: build_app(store.clone(), follow_ms=1000)) as url:
        pg, errors = open_page(browser, url)
        pg.wait_for_selector("canvas", timeout=60_000)
        views = wait_until(lambda: pn.state.cache.get(SESSION_VIEWS))[-1]
        s = views["strips"].store
        growing.thread.start()
        t0 = time.monotonic()
        first = scalar_steps(views)
        loss = pg.locator(".dnt-scalars canvas").first
        loss.wait_for(timeout=30_000)
        loss_before = pixels(loss)
        strips_renders = views["strips"].renders
        # a third of the time on the overview, then the other tabs in turn
        wait_until(lambda: time.monotonic() - t0 > SECONDS / 3, timeout=SECONDS)
        assert scalar_steps(views) > first  # the loss/lr sources grew ...
        after = pixels(loss)
        h, w = min(after.shape[0], loss_before.shape[0]), min(after.shape[1], loss_before.shape[1])
        assert np.abs(after[:h, :w] - loss_before[:h, :w]).sum() > 1_000  # ... and were redrawn
        assert views["strips"].renders > strips_renders
        shot(pg, "follow-overview")
        opened: dict[str, tuple[Any, str, int]] = {}
        for i, title in enumerate(TABS[1:], start=1):
            pg.locator(".bk-tab", has_text=title).first.click()
            key = {1: "detail", 2: "heat", 3: "dist"}[i]
            view = wait_until(lambda k=key: views.get(k), timeout=60)
            count = {"detail": "renders", "dist": "frames"}.get(key)
            if count is not None:
                opened[key] = (view, count, getattr(view, count))
                for _ in range(4):  # more rows while this tab is open, whatever the timing
                    growing.write_next()
                wait_until(lambda v=view, c=count, n=opened[key][2]: getattr(v, c) > n, 60)
            wait_until(lambda i=i: time.monotonic() - t0 > SECONDS * (1 + i) / 5, SECONDS)
        shot(pg, "follow-distribution")
        pg.locator(".bk-tab", has_text=TABS[0]).first.click()
        growing.stop.set()
        growing.thread.join(timeout=30)
        while growing.write_next():
            pass
        growing.writer.close()
        final = load(growing.writer.path)
        last = int(final.steps[-1])
        last_scalar = int(final.select(kind="scalar").column("step").to_numpy().max())
        wait_until(lambda: int(s.current.steps[-1]) == last, timeout=90)  # a loaded CI box
        wait_until(lambda: scalar_steps(views) == last_scalar, timeout=30)
        pg.wait_for_timeout(2000)
        shot(pg, "follow-end")
        # the views opened while the file grew redrew with it, and cover its last step
        for key, (view, count, n) in opened.items():
            assert getattr(view, count) > n, key
        assert views["dist"].player.end == s.current.steps.size - 1
        pg.close()
    pn.state.cache.pop(SESSION_VIEWS, None)
    assert growing.written > 10
    assert errors == [], f"browser console errors over {SECONDS:.0f} s: {errors[:5]}"
