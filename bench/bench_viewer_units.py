"""Units × steps heatmaps at scale: cache build (time, peak memory), first paint, zoom/pan
re-render (server side), and zoom latency in headless Chromium, on a synthetic per-unit trace.

    PYTHONPATH=python:viewer .venv/bin/python bench/bench_viewer_units.py [--units-cells 1e9]
        [--quick] [--no-browser] [--out DIR] [--keep]

The trace (``write_synthetic_units`` of ``tests/viewer/_synthetic.py``: one ReLU layer,
``unit_mean`` and ``unit_firing``; 10**9 cells = 10**5 units × 10**4 steps, 8 GB uncompressed) is
written once into ``--out`` and reused. ``--quick`` is 10**4 × 10**3 (the test suite runs it).

- build: a fresh process opens the trace and builds the ``unit_mean`` pyramid and the dead map
  (``.units`` cache beside the trace); peak anonymous memory is sampled every 20 ms, and the
  process's peak resident set (file pages of the memory-mapped trace and cache included) read
  at the end;
- first paint (server): a fresh ``UnitData`` over the cached pyramid, the full-range window,
  Datashader's rasterize to 1000 × 600 and the Bokeh figure;
- zoom/pan (server): the same for windows 1×, 4×, … zoomed in, and panned by 30 % at each zoom;
- browser: the heatmap served on 127.0.0.1 in Debian's Chromium (flags of bench_viewer.py), mouse
  wheel zooms and drags timed until the canvas stops changing (end to end, server included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "viewer")]

# the synthetic trace builders are test fixtures (tests/viewer/_synthetic.py), of this checkout
# appended: children get sys.path[:2] (ROOT's packages) as their PYTHONPATH
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "viewer"))
from _synthetic import units_spec, write_synthetic_units  # noqa: E402

MODULE = "hidden_act"
WIDTH, HEIGHT = 1000, 600
ZOOMS = (1, 4, 16, 64, 256, 1024)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def build_phase(path: str) -> dict[str, float]:
    """Run in a fresh process: build the cache, report times and peak memory."""
    from dnntrace.storage import load
    from dnntrace_viewer.units_data import UnitData

    peak = {"anon": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
            time.sleep(0.02)

    base = _status_kb("RssAnon")
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    data = UnitData(load(path))
    pyr = data.pyramid(MODULE, "unit_mean")
    t1 = time.perf_counter()
    steps, dead = data.map_pyramid(MODULE, "dead")
    frac = data.dead_fractions()
    t2 = time.perf_counter()
    stop.set()
    th.join()
    peak["anon"] = max(peak["anon"], _status_kb("RssAnon"))
    return {
        "units": pyr.shape[0],
        "steps": pyr.shape[1],
        "levels": len(pyr.levels),
        "build_mean_s": t1 - t0,
        "build_dead_s": t2 - t1,
        "dead_fraction_last": float(frac.dead.iloc[-1]),
        "rss_anon_base_mb": base / 1024,
        "rss_anon_peak_mb": peak["anon"] / 1024,
        "rss_peak_mb": _status_kb("VmHWM") / 1024,
        "cache_location": data._stat_entry(MODULE, "unit_mean").location,
    }


def render_once(heat: Any, x_range: Any, y_range: Any) -> dict[str, float]:
    """Window + hv.Image, Datashader rasterize, Bokeh figure: seconds of each."""
    import holoviews as hv
    from holoviews.operation.datashader import rasterize

    t0 = time.perf_counter()
    img = heat._image(heat.module, heat.kind, x_range, y_range)
    t1 = time.perf_counter()
    shaded = rasterize(img, width=WIDTH, height=HEIGHT, dynamic=False)
    t2 = time.perf_counter()
    hv.renderer("bokeh").get_plot(shaded.opts(cnorm="eq_hist", width=WIDTH, height=HEIGHT))
    t3 = time.perf_counter()
    arr = shaded.data[shaded.vdims[0].name].values
    assert np.isfinite(arr).any(), "blank render"
    return {"window_s": t1 - t0, "rasterize_s": t2 - t1, "bokeh_s": t3 - t2, "total_s": t3 - t0}


def server_phase(path: str) -> dict[str, Any]:
    """Run in a fresh process with the cache built: first paint and zoom/pan re-renders."""
    t0 = time.perf_counter()
    from dnntrace.storage import load
    from dnntrace_viewer.units_data import UnitData
    from dnntrace_viewer.views_units import UnitHeatmap, _matrix_source

    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = UnitData(load(path))
    heat = UnitHeatmap(
        _matrix_source(data), [MODULE], ["unit_mean", "dead"], width=WIDTH, height=HEIGHT
    )
    first = render_once(heat, None, None)
    first_total = time.perf_counter() - t0
    steps = data.steps(MODULE, "unit_mean")
    n_u, n_s = data.pyramid(MODULE, "unit_mean").shape
    rng = np.random.default_rng(0)
    zooms: dict[str, dict[str, float]] = {}
    for kind in ("unit_mean", "dead"):
        heat.kind = kind
        for z in ZOOMS:
            times = []
            for _ in range(5):
                w_s, w_u = n_s / z, n_u / z
                xs = rng.uniform(0, n_s - w_s)
                us = rng.uniform(0, n_u - w_u)
                for pan in (0.0, 0.3):  # a zoom, then a pan by 30 % of the view
                    x0 = float(steps[0]) + xs + pan * w_s
                    x_range = (x0, x0 + w_s)
                    times.append(render_once(heat, x_range, (us, us + w_u)))
            zooms[f"{kind} {z}x"] = {
                k: statistics.median(t[k] for t in times) for k in ("window_s", "total_s")
            }
    return {
        "import_s": t_import,
        "first_paint_server_s": first_total,
        "first_paint_parts": first,
        "zoom": zooms,
    }


def browser_phase(path: str, events: int = 12) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    from bench_viewer import JS_COLOURS, JS_WATCH, serve_local
    from bench_viewer import browser as launch
    from dnntrace_viewer.units_data import UnitData
    from dnntrace_viewer.views_units import UnitHeatmap, _matrix_source

    sessions: list[UnitHeatmap] = []

    def make() -> Any:
        data = UnitData.open(path)
        heat = UnitHeatmap(
            _matrix_source(data), [MODULE], ["unit_mean", "dead"], width=WIDTH, height=HEIGHT
        )
        sessions.append(heat)
        return heat.panel()

    srv, port = serve_local(make)
    try:
        with sync_playwright() as p:
            ctx = launch(p)
            try:
                page = ctx.new_page()
                t0 = time.perf_counter()
                page.goto(f"http://127.0.0.1:{port}/")
                while page.evaluate(JS_COLOURS, "dnt-units-heat") < 50:
                    time.sleep(0.02)
                paint = time.perf_counter() - t0
                time.sleep(1.0)
                heat = sessions[-1]
                box = page.locator(".dnt-units-heat canvas").first.bounding_box()
                cx, cy = box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5
                e2e = []
                n0 = len(heat.render_times)
                for i in range(events):
                    page.evaluate(JS_WATCH, "dnt-units-heat")
                    before = heat.renders
                    page.mouse.move(cx, cy)
                    if i % 3 == 2:
                        page.mouse.down()
                        page.mouse.move(cx + 60, cy + 10, steps=4)
                        page.mouse.up()
                    else:
                        page.mouse.wheel(0, -360)
                    page.mouse.move(5, 5)
                    ms = page.evaluate("() => window.__dnt")
                    if heat.renders > before:
                        e2e.append(ms / 1000)
                page.close()
            finally:
                ctx.close()
    finally:
        srv.stop()
    server = heat.render_times[n0:]
    return {
        "browser_first_paint_s": paint,
        "browser_zoom_e2e_median_s": statistics.median(e2e) if e2e else float("nan"),
        "browser_zoom_e2e_max_s": max(e2e) if e2e else float("nan"),
        "browser_window_median_s": statistics.median(server) if server else float("nan"),
        "browser_events": len(e2e),
    }


def _child(phase: str, path: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:2])}
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--phase", phase, path],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{phase} phase failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units-cells", type=float, default=1e9)
    ap.add_argument("--quick", action="store_true", help="10**4 units x 10**3 steps")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the trace and its cache")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "dnntrace-bench"))
    ap.add_argument("--phase", choices=["build", "server", "browser"], help=argparse.SUPPRESS)
    ap.add_argument("trace", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        fn = {"build": build_phase, "server": server_phase, "browser": browser_phase}
        print(json.dumps(fn[args.phase](args.trace)))
        return {}
    cells = 1e7 if args.quick else args.units_cells
    spec = units_spec(cells)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"units-{spec.units}x{spec.steps}.arrow")
    res: dict[str, Any] = {"units": spec.units, "steps": spec.steps, "cells": spec.cells}
    try:
        if not os.path.exists(path):
            t = time.perf_counter()
            info = write_synthetic_units(path, spec)
            res["write_s"] = time.perf_counter() - t
            res["trace_mb"] = info["bytes"] / 1e6
            print(f"wrote {path}: {info['bytes'] / 1e9:.2f} GB in {res['write_s']:.1f} s")
        shutil.rmtree(path + ".units", ignore_errors=True)
        res["build"] = _child("build", path)
        print("build", res["build"], flush=True)
        res["server"] = _child("server", path)
        print("first paint (server)", res["server"]["first_paint_server_s"], flush=True)
        if not args.no_browser:
            res["browser"] = _child("browser", path)
            print("browser", res["browser"], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(path + ".units", ignore_errors=True)
            if os.path.exists(path):
                os.remove(path)
    b, s = res["build"], res["server"]
    print(f"\n{spec.units} units x {spec.steps} steps = {spec.cells:.3g} cells")
    print("| measure | value |")
    print("|---|---|")
    rows = [
        ("cache build, unit_mean pyramid (s)", b["build_mean_s"]),
        ("cache build, dead map + fractions (s)", b["build_dead_s"]),
        ("peak anonymous memory during build (MB)", b["rss_anon_peak_mb"]),
        ("peak resident incl. mapped file pages (MB)", b["rss_peak_mb"]),
        (
            "first paint, server: open cache + window + rasterize + Bokeh (s)",
            s["first_paint_server_s"],
        ),
    ]
    for name, z in s["zoom"].items():
        rows.append((f"re-render {name}: window / total (s)", (z["window_s"], z["total_s"])))
    if "browser" in res:
        br = res["browser"]
        rows += [
            ("browser first paint, served (s)", br["browser_first_paint_s"]),
            ("browser zoom/pan end to end, median (s)", br["browser_zoom_e2e_median_s"]),
            ("browser zoom/pan end to end, max (s)", br["browser_zoom_e2e_max_s"]),
            ("browser events timed", br["browser_events"]),
        ]
    for name, v in rows:
        val = " / ".join(f"{x:.3g}" for x in v) if isinstance(v, tuple) else f"{v:.3g}"
        print(f"| {name} | {val} |")
    return res


if __name__ == "__main__":
    main()
