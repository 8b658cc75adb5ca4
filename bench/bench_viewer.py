"""Viewer timings in headless Chromium: first paint (with and without the LOD cache), zoom/pan
end to end, animation frame rate; for a >= 10**9-point synthetic trace and a demo-size one.

    PYTHONPATH=python:viewer .venv/bin/python bench/bench_viewer.py [--out DIR] [--quick]
        [--compare CHECKOUT]   # e.g. `git archive <before> python viewer | tar -x -C CHECKOUT`

First paint: from starting ``python -m dnntrace_viewer TRACE --no-browser --port N`` to the layer
strips drawn in an already running browser (the browser's own start is not counted).
Zoom/pan: 16 gestures on the histogram-over-time plot (wheel in, drag, wheel out, drag, ...);
end to end = from the gesture's last input event (the wheel, the drag's last move), timed in the
page, to its last pixel change (requestAnimationFrame polling of the canvas), waiting until the
page and the server have both been idle for 1 s (at most 12 s), server round trips included.
Reported: the median and the maximum over all gestures, and the median over the gestures after
which the server sent a new image (a new level, or any re-render for a viewer without levels);
server time = the median render on the server.
Animation: the Player asked for 20 frames/s (50 ms) on the distribution view; frames/s = distinct
step labels drawn in the page per second over 6 s.
With --compare, each case runs once per checkout, alternating, in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

# DNT_BENCH_ROOT: a checkout whose viewer to measure (--compare runs this file once per checkout)
ROOT = os.environ.get("DNT_BENCH_ROOT") or os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))
)
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "viewer")]
# an editable install's import hook would load this checkout's packages whatever sys.path says
NO_EDITABLE = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path"
    " if not type(f).__module__.startswith('_editable')]"
)
exec(NO_EDITABLE)

# the synthetic trace builders are test fixtures (tests/viewer/_synthetic.py), of this checkout
# appended: children get sys.path[:2] (ROOT's packages) as their PYTHONPATH
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "viewer"))
from _synthetic import SyntheticSpec, write_synthetic  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
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

CASES = {
    # 2,000 steps x 8 modules x 65,536 activations a step = 1.05e9 (step, value) points
    "1e9": SyntheticSpec(
        steps=2000,
        layers=4,
        width=512,
        batch=128,
        kinds=("activation",),
        nan_step=1500,
        nan_layer=2,
        dead_layer=3,
        frozen_layer=None,
        steps_per_batch=50,
        seed=1,
    ),
    "demo": SyntheticSpec(),  # 200 steps, 6 blocks, all four kinds
}

JS_FIND = """
const findCanvas = (cls) => {
  let best = null;
  const walk = (root, inside) => {
    for (const el of root.querySelectorAll('*')) {
      const inn = inside || (el.classList && el.classList.contains(cls));
      if (el.shadowRoot) walk(el.shadowRoot, inn);
      const area = best ? best.width * best.height : 0;
      if (inn && el.tagName === 'CANVAS' && el.width * el.height > area
          && el.getBoundingClientRect().width > 0) best = el;
    }
  };
  walk(document, false);
  return best;
};
const hashOf = (c) => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 0;
  for (let i = 0; i < d.length; i += 28) h = (h * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) | 0;
  return h;
};
"""

JS_WATCH = (
    "(cls) => {"
    + JS_FIND
    + """
  if (!window.__dntListening) {  // the time of the gesture's last input event, page clock
    window.__dntListening = true;
    const mark = (e) => {
      if (e.type !== 'pointermove' || e.buttons) window.__dntInput = performance.now();
    };
    for (const t of ['wheel', 'pointerdown', 'pointermove', 'pointerup'])
      window.addEventListener(t, mark, {capture: true, passive: true});
  }
  window.__dntInput = null; window.__dntStop = false;
  window.__dnt = new Promise((resolve) => {
    const c = findCanvas(cls); const t0 = performance.now();
    let last = t0, prev = hashOf(c); window.__dntChanges = []; window.__dntLast = t0;
    const tick = () => {
      const now = performance.now(); const h = hashOf(c);
      if (h !== prev) {
        prev = h; last = now; window.__dntLast = now;
        window.__dntChanges.push(Math.round(now - t0));
      }
      if (!window.__dntStop) requestAnimationFrame(tick);
      else resolve(last - (window.__dntInput === null ? t0 : Math.min(window.__dntInput, last)));
    };
    requestAnimationFrame(tick);
  });
}"""
)


def settle(page: Any, view: Any, quiet: float = 1.0, limit: float = 12.0) -> float:
    """Waits until neither the page's pixels nor the server's render count have changed for
    ``quiet`` seconds (at most ``limit``), then ends the page's watch: seconds from the
    gesture's last input event to the last pixel change."""
    t0 = time.perf_counter()
    renders, since = view.renders, t0
    while time.perf_counter() - t0 < limit:
        time.sleep(0.1)
        if view.renders != renders:
            renders, since = view.renders, time.perf_counter()
        idle_page = page.evaluate("() => performance.now() - window.__dntLast") / 1000
        if idle_page >= quiet and time.perf_counter() - since >= quiet:
            break
    page.evaluate("() => { window.__dntStop = true; }")
    return page.evaluate("() => window.__dnt") / 1000


JS_COLOURS = (
    "(cls) => {"
    + JS_FIND
    + """
  const c = findCanvas(cls); if (!c) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const s = new Set();
  for (let i = 0; i < d.length; i += 4 * 13) s.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
  return s.size;
}"""
)

JS_LABELS = """(ms) => new Promise((resolve) => {
  const find = () => {
    let t = null;
    const walk = (root) => {
      for (const el of root.querySelectorAll('*')) {
        if (el.shadowRoot) walk(el.shadowRoot);
        if (el.tagName === 'B' && /^step /.test(el.textContent)) t = el;
      }
    };
    walk(document); return t;
  };
  const t0 = performance.now(); const seen = []; let prev = null;
  const tick = () => {
    const el = find();  // the pane replaces its content on each update: look it up again
    const v = el ? el.textContent : prev;
    if (v !== prev) { seen.push(v); prev = v; }
    if (performance.now() - t0 < ms) requestAnimationFrame(tick); else resolve(seen); };
  requestAnimationFrame(tick);
})"""


def browser(p: Any) -> Any:
    return p.chromium.launch_persistent_context(
        tempfile.mkdtemp(prefix="dnt-bench-"),
        executable_path=CHROMIUM,
        headless=True,
        args=ARGS,
        viewport={"width": 1300, "height": 1100},
    )


def serve_local(make: Any) -> tuple[Any, int]:
    """Serves ``make`` (a Panel app factory) on 127.0.0.1 in a thread: (server, port)."""
    import panel as pn

    from dnntrace_viewer.cli import free_port

    port = free_port()
    srv = pn.serve(
        {"/": make},
        port=port,
        address="127.0.0.1",
        show=False,
        threaded=True,
        start=True,
        print_url=False,
    )
    # the server thread binds the port a moment after pn.serve returns: wait for it (bounded)
    wait_listening(port, 60)
    return srv, port


def wait_listening(port: int, seconds: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Returns once 127.0.0.1:``port`` accepts a connection; raises after ``seconds`` or when
    the viewer process ``proc`` has exited."""
    deadline = time.perf_counter() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError("viewer exited") from None
            if time.perf_counter() > deadline:
                raise RuntimeError(
                    f"viewer not listening on port {port} after {seconds} s"
                ) from None
            time.sleep(0.02)


def first_paint(ctx: Any, path: str, *, cached: bool) -> float:
    from dnntrace_viewer.cli import free_port

    if not cached:
        shutil.rmtree(path + ".lod", ignore_errors=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:2])}
    page = ctx.new_page()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            NO_EDITABLE
            + "; import runpy; runpy.run_module('dnntrace_viewer', run_name='__main__')",
            path,
            "--no-browser",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # open the page once the server listens, as `dnntrace-view` opens the browser: retrying
        # page.goto on a refused port made Chromium render an error page every 50 ms, CPU taken
        # from the starting server on 2 cores (measured: 8.1 s instead of 4.2 s to a cold paint)
        wait_listening(port, 120, proc)
        page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
        while page.evaluate(JS_COLOURS, "dnt-strips") < 50:
            time.sleep(0.02)
        return time.perf_counter() - t0
    finally:
        page.close()
        proc.terminate()
        proc.wait(10)


def interactive(ctx: Any, path: str, n: int, shots: str | None = None) -> dict[str, float]:
    import panel as pn

    from dnntrace_viewer.app import SESSION_VIEWS, build_app
    from dnntrace_viewer.data_store import RunStore

    store = RunStore(paths=[path])
    pn.state.cache[SESSION_VIEWS] = []
    srv, port = serve_local(lambda: build_app(store.clone(), follow_ms=None))
    page = ctx.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        while not pn.state.cache[SESSION_VIEWS]:
            time.sleep(0.05)
        views = pn.state.cache[SESSION_VIEWS][-1]
        page.get_by_text("Histogram over time", exact=True).click()
        while "detail" not in views:  # built when its tab first opens (since the lazy tabs)
            time.sleep(0.05)
        detail = views["detail"]
        while page.evaluate(JS_COLOURS, "dnt-detail") < 50:
            time.sleep(0.05)
        time.sleep(1.0)
        box = page.locator(".dnt-detail").bounding_box()
        cx, cy = box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5
        e2e: list[float] = []
        e2e_level: list[float] = []  # events after which the server sent a new level
        timings = detail.render_times
        n0 = len(timings)
        for i in range(n):
            page.evaluate(JS_WATCH, "dnt-detail")
            before = detail.renders
            if i % 2 == 0:
                page.mouse.move(cx, cy)
                page.mouse.wheel(0, -240 if i % 4 == 0 else 200)
            else:
                page.mouse.move(cx, cy)
                page.mouse.down()
                page.mouse.move(cx + 60, cy + 10, steps=4)
                page.mouse.up()
            page.mouse.move(5, 5)  # away from the plot: no hover drawing
            t = settle(page, detail)
            if os.environ.get("DNT_BENCH_DEBUG"):
                print("changes (ms):", page.evaluate("() => window.__dntChanges"))
            e2e.append(t)
            if detail.renders > before:
                e2e_level.append(t)
            if shots and i in (0, 2, n - 1):
                page.locator(".dnt-detail").screenshot(path=f"{shots}-zoom{i}.png")
        server = timings[n0:]
        page.get_by_text("Distribution at a step", exact=True).click()
        while "dist" not in views:
            time.sleep(0.05)
        time.sleep(1.5)
        dist = views["dist"]
        dist.player.interval = 50
        time.sleep(0.3)
        page.locator("button.play").first.click()
        t = time.perf_counter()
        while dist.frames < 3 and time.perf_counter() - t < 10:
            time.sleep(0.05)
        f0 = dist.frames
        seen = page.evaluate(JS_LABELS, 6000)
        server_fps = (dist.frames - f0) / 6.0
        fps = (len(seen) - 1) / 6.0
        return {
            "zoom_e2e_median_s": statistics.median(e2e) if e2e else float("nan"),
            "zoom_e2e_max_s": max(e2e) if e2e else float("nan"),
            "zoom_new_level_median_s": (
                statistics.median(e2e_level) if e2e_level else float("nan")
            ),
            "zoom_new_levels": len(e2e_level),
            "zoom_server_median_s": statistics.median(server) if server else float("nan"),
            "zoom_events": len(e2e),
            "animation_fps": fps,
            "server_frames_per_s": server_fps,
        }
    finally:
        page.close()
        srv.stop()


def measure(name: str, out: str) -> dict[str, Any]:
    """Every timing of one case, with the viewer found on sys.path."""
    from playwright.sync_api import sync_playwright

    path = os.path.join(out, f"{name}.arrow")
    if not os.path.exists(path):
        t = time.perf_counter()
        info = write_synthetic(path, CASES[name])
        print(
            f"{name}: wrote {info['points']:.3g} points, {info['rows']} rows, "
            f"{info['bytes'] / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
    from dnntrace.storage import load
    from dnntrace_viewer import lod as LD

    tr = load(path)
    points = float(
        np.sum(tr.table.column("count").to_numpy() - tr.table.column("nan_count").to_numpy())
    )
    shutil.rmtree(path + ".lod", ignore_errors=True)
    t = time.perf_counter()
    LD.open_lods(tr)
    build = time.perf_counter() - t
    with sync_playwright() as p:
        ctx = browser(p)
        try:
            cold = first_paint(ctx, path, cached=False)
            warm = statistics.median(first_paint(ctx, path, cached=True) for _ in range(3))
            shots = os.path.join(out, f"{name}-{os.path.basename(ROOT.rstrip('/'))}")
            inter = interactive(ctx, path, 16, shots)
        finally:
            ctx.close()
    return {
        "trace": name,
        "viewer_file": LD.__file__,
        "points": points,
        "rows": tr.table.num_rows,
        "mb": os.path.getsize(path) / 1e6,
        "lod_build_s": build,
        "first_paint_no_cache_s": cold,
        "first_paint_cached_s": warm,
        **inter,
    }


COLS = [
    "viewer",
    "trace",
    "lod_build_s",
    "first_paint_no_cache_s",
    "first_paint_cached_s",
    "zoom_e2e_median_s",
    "zoom_e2e_max_s",
    "zoom_events",
    "zoom_new_levels",
    "zoom_new_level_median_s",
    "zoom_server_median_s",
    "animation_fps",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "dnntrace-bench"))
    ap.add_argument("--quick", action="store_true", help="demo trace only")
    ap.add_argument(
        "--compare",
        metavar="CHECKOUT",
        help="also measure the viewer of another checkout (e.g. `git archive` of the commit "
        "before), alternating with this one case by case, in this run",
    )
    ap.add_argument("--trace", choices=list(CASES), help="this case only")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one case, JSON on stdout (--compare)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.case:
        print("RESULT " + json.dumps(measure(args.case, args.out)), flush=True)
        return
    names = [n for n in CASES if not (args.quick and n != "demo")]
    if args.trace:
        names = [args.trace]
    roots = [args.compare, ROOT] if args.compare else [ROOT]
    rows = []
    for name in names:
        for root in roots:
            env = {**os.environ, "DNT_BENCH_ROOT": root}
            cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--out", args.out]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                sys.exit(f"{name} with {root} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
            row = {"viewer": root, **json.loads(line[-1][7:])}
            assert row.pop("viewer_file").startswith(root), "measured another checkout's viewer"
            rows.append(row)
            print(row, flush=True)
    print(f"load average after the run: {os.getloadavg()}")
    print("| " + " | ".join(COLS) + " |")
    print("|" + "---|" * len(COLS))
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in COLS]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
