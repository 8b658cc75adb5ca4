"""Exports without a browser: PNG of a view, GIF/MP4 of the step animation (imageio), and a
self-contained HTML report (inline resources and images: opens offline).

Images are drawn from the LOD tables directly (numpy + Pillow), so exporting needs neither a
browser nor selenium.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

import colorcet as cc
import numpy as np
from PIL import Image, ImageDraw

from .data_store import RunStore

LABEL_W = 90
_FIRE = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in cc.fire], np.uint8)


def shade(img: np.ndarray) -> np.ndarray:
    """Counts -> RGB with the fire colormap on a log scale (empty pixels dark grey)."""
    out = np.full(img.shape + (3,), 17, np.uint8)
    pos = img > max(float(img.max()) * 1e-6, 1e-3) if img.size else img > 0
    if pos.any():
        lv = np.log10(img[pos])
        lo, hi = lv.min(), lv.max()
        t = (lv - lo) / (hi - lo) if hi > lo else np.ones_like(lv)
        out[pos] = _FIRE[np.clip((t * 255).astype(int), 0, 255)]
    return out


def strips_image(store: RunStore, width: int = 800, strip: int = 44) -> Image.Image:
    run = store.current
    kind = store.kind
    ymap = run.ymap(kind, store.yscale)
    mods = [m for m in run.modules if run.lod(m, kind) is not None]
    steps = run.steps
    xr = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5) if steps.size else (0.0, 1.0)
    lo, hi = run.value_range(kind)
    yr = (float(ymap.fwd(lo)), float(ymap.fwd(hi)))
    canvas = Image.new("RGB", (width + LABEL_W, 24 + strip * max(len(mods), 1) + 18), "white")
    d = ImageDraw.Draw(canvas)
    d.text(
        (4, 4),
        f"{run.name}: {kind} per layer (input at top), steps {xr[0] + 0.5:g}"
        f"-{xr[1] - 0.5:g}, value {lo:.3g}..{hi:.3g} ({ymap.scale})",
        fill="black",
    )
    for i, m in enumerate(mods):
        img = run.lods[(m, kind)].render(xr, yr, width, strip - 2, ymap)
        rgb = shade(np.flipud(img))
        canvas.paste(Image.fromarray(rgb), (LABEL_W, 24 + i * strip))
        d.text((4, 24 + i * strip + strip // 2 - 6), m[:14], fill="black")
    return canvas


def detail_image(
    store: RunStore, width: int = 800, height: int = 300, cursor_step: int | None = None
) -> Image.Image:
    run = store.current
    kind, module = store.kind, store.module
    ymap = run.ymap(kind, store.yscale)
    steps = run.steps
    xr = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5) if steps.size else (0.0, 1.0)
    lo, hi = run.value_range(kind, module)
    yr = (float(ymap.fwd(lo)), float(ymap.fwd(hi)))
    canvas = Image.new("RGB", (width + LABEL_W, height + 40), "white")
    d = ImageDraw.Draw(canvas)
    d.text((4, 4), f"{run.name}: {module} {kind} over steps", fill="black")
    lod = run.lod(module, kind) if module is not None else None
    if lod is not None:
        img = lod.render(xr, yr, width, height, ymap)
        canvas.paste(Image.fromarray(shade(np.flipud(img))), (LABEL_W, 24))
    for y, label in ymap.ticks(*yr):
        py = 24 + int((yr[1] - y) / (yr[1] - yr[0]) * height)
        d.text((4, py - 6), label, fill="black")
    if cursor_step is not None:
        px = LABEL_W + int((cursor_step - xr[0]) / (xr[1] - xr[0]) * width)
        d.line([(px, 24), (px, 24 + height)], fill=(80, 200, 255), width=2)
    d.text((LABEL_W, height + 26), f"step {xr[0] + 0.5:g}", fill="black")
    d.text((LABEL_W + width - 80, height + 26), f"step {xr[1] - 0.5:g}", fill="black")
    return canvas


def heatmap_image(store: RunStore, width: int = 800, row: int = 24) -> Image.Image:
    mods, steps, z = store.current.heatmap(store.stat, store.kind)
    canvas = Image.new("RGB", (width + LABEL_W, 24 + row * max(len(mods), 1)), "white")
    d = ImageDraw.Draw(canvas)
    d.text((4, 4), f"{store.kind} {store.stat} by layer and step", fill="black")
    if mods:
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.log10(np.abs(z)) if store.stat in ("rms", "std", "absmax", "l2") else z
        fin = np.isfinite(v)
        lo, hi = (v[fin].min(), v[fin].max()) if fin.any() else (0, 1)
        t = np.where(fin, (v - lo) / ((hi - lo) or 1), 0)
        rgb = _FIRE[np.clip((t * 255).astype(int), 0, 255)]
        rgb[~fin] = 200
        im = Image.fromarray(rgb).resize((width, row * len(mods)), Image.NEAREST)
        canvas.paste(im, (LABEL_W, 24))
        for i, m in enumerate(mods):
            d.text((4, 24 + i * row + row // 2 - 6), m[:14], fill="black")
    return canvas


def distribution_frame(
    store: RunStore, step: int, width: int = 800, height: int = 220
) -> Image.Image:
    """One animation frame: the histogram over time with a cursor, and the distribution of the
    overlaid layers at ``step`` below it."""
    top = detail_image(store, width, 200, cursor_step=step)
    run = store.current
    kind = store.kind
    ymap = run.ymap(kind, store.yscale)
    lo, hi = run.value_range(kind)
    yr = (float(ymap.fwd(lo)), float(ymap.fwd(hi)))
    bottom = Image.new("RGB", (width + LABEL_W, height + 30), "white")
    d = ImageDraw.Draw(bottom)
    d.text((4, 4), f"{kind} distribution at step {step}", fill="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    curves = [
        (m, *run.distribution(m, kind, step, ymap, yr, width // 2)) for m in store.overlay[:5]
    ]
    ymax = max([float(f.max()) for _, _, f in curves if f.size] + [1e-9])
    for i, (m, x, f) in enumerate(curves):
        px = LABEL_W + (x - yr[0]) / (yr[1] - yr[0]) * width
        py = 20 + height - f / ymax * (height - 10)
        d.line(list(zip(px.tolist(), py.tolist(), strict=True)), fill=colours[i], width=2)
        d.text((4, 24 + 14 * i), m[:14], fill=colours[i])
    for y, label in ymap.ticks(*yr):
        px = LABEL_W + int((y - yr[0]) / (yr[1] - yr[0]) * width)
        d.text((px - 10, height + 16), label, fill="black")
    out = Image.new("RGB", (top.width, top.height + bottom.height), "white")
    out.paste(top, (0, 0))
    out.paste(bottom, (0, top.height))
    return out


def animation_frames(store: RunStore, max_frames: int = 120) -> list[np.ndarray]:
    steps = store.step_values()
    pick = (
        steps[np.unique(np.linspace(0, steps.size - 1, min(max_frames, steps.size)).astype(int))]
        if steps.size
        else steps
    )
    return [np.asarray(distribution_frame(store, int(s))) for s in pick]


def html_report(store: RunStore, path: str) -> None:
    import panel as pn
    from bokeh.resources import INLINE

    from .views import describe, fmt_health

    def png(im: Image.Image) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    run = store.current
    report = pn.Column(
        pn.pane.Markdown(describe(store, store.run, store.version)),
        pn.pane.DataFrame(fmt_health(run.health()), index=False, sizing_mode="fixed", width=820),
        pn.pane.PNG(png(strips_image(store)), width=890),
        pn.pane.PNG(png(detail_image(store)), width=890),
        pn.pane.PNG(png(heatmap_image(store)), width=890),
    )
    report.save(path, resources=INLINE, embed=True, title=f"dnntrace report: {run.name}")
    # Panel's page template links its favicons from a CDN: drop them, the report is offline
    with open(path, encoding="utf-8") as f:
        html = f.read()
    html = re.sub(r"<link[^>]+rel=\"(?:apple-touch-icon|icon)\"[^>]*>", "", html)
    with open(path, "w", encoding="utf-8") as f:
        f.write(html)


def export(store: RunStore, out: str, *, view: str = "overview", **_: Any) -> str:
    """Write ``out``; the format follows the extension. Returns the path written."""
    ext = os.path.splitext(out)[1].lower()
    if ext == ".png":
        im = {"overview": strips_image, "detail": detail_image, "heatmap": heatmap_image}[view](
            store
        )
        im.save(out)
    elif ext in (".gif", ".mp4"):
        import imageio.v2 as iio

        frames = animation_frames(store)
        if ext == ".gif":
            iio.mimsave(out, frames, duration=0.2, loop=0)
        else:
            h, w = frames[0].shape[:2]
            frames = [f[: h - h % 2, : w - w % 2] for f in frames]  # yuv420p: even sizes
            iio.mimsave(out, frames, fps=5, macro_block_size=1)
    elif ext == ".html":
        html_report(store, out)
    else:
        raise ValueError(f"cannot export to {out!r}: use .png, .gif, .mp4 or .html")
    return out


__all__ = ["animation_frames", "export", "shade"]
