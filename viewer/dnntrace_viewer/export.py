"""Exports without a browser: PNG of a view, GIF/MP4 of the step animation (imageio), and a
self-contained HTML report (no script, style sheet, font or image from anywhere else: it opens
offline and runs nothing).

Images are drawn from the LOD tables directly (numpy + Pillow), so exporting needs neither a
browser nor selenium. Every image carries its axes (step, value), a colour bar with its scale,
and every module's full name (the common prefix of long names folded into the title, never a
truncated name); the root module is labelled ``<root>``. Text uses Pillow's bundled font, so an
export looks the same on every machine.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from typing import Any

import colorcet as cc
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data_store import RunStore
from .safe import common_prefix, html_text, module_label

FONT_SIZE = 13
PAD = 8
MAX_LABEL_CHARS = 48  # longer names get their common prefix folded (stated in the title)
COLORBAR_W = 14
_FIRE = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in cc.fire], np.uint8)
_BMY = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in cc.bmy], np.uint8)
BG = (17, 17, 17)


def font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font (the same on every machine)."""
    return ImageFont.load_default(size=size)


def text_width(text: str, size: int = FONT_SIZE) -> int:
    return int(math.ceil(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(text, font=font(size))))


def labels_for(mods: list[str]) -> tuple[list[str], str]:
    """(labels, folded prefix): full names, or with their common prefix shown once as ``…``
    when a name is longer than ``MAX_LABEL_CHARS``. Labels stay distinct."""
    full = [module_label(m) for m in mods]
    if max((len(s) for s in full), default=0) <= MAX_LABEL_CHARS:
        return full, ""
    pre = common_prefix(mods)
    if not pre:
        return full, ""
    keep = pre[:-1].rfind(".") + 1  # fold all but the prefix's last component
    if keep == 0:
        return full, ""
    out = [("…" + m[keep:]) if m.startswith(pre) else module_label(m) for m in mods]
    return (out, pre[:keep]) if len(set(out)) == len(out) else (full, "")


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """About ``n`` round numbers (1, 2, 5 × 10^k apart) within [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.3g}"


def shade(img: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Counts -> RGB with the fire colormap on a log scale between 10**lo and 10**hi (default:
    the image's own range); empty pixels dark grey."""
    out = np.empty(img.shape + (3,), np.uint8)
    out[...] = BG
    pos = img > max(float(img.max()) * 1e-6, 1e-3) if img.size else img > 0
    if pos.any():
        lv = np.log10(img[pos])
        a = float(lv.min()) if lo is None else lo
        b = float(lv.max()) if hi is None else hi
        t = (lv - a) / (b - a) if b > a else np.ones_like(lv)
        out[pos] = _FIRE[np.clip((t * 255).astype(int), 0, 255)]
    return out


def _count_range(imgs: list[np.ndarray]) -> tuple[float, float]:
    """log10 of the smallest and largest drawn count over all images (a shared colour scale)."""
    lo, hi = math.inf, -math.inf
    for img in imgs:
        if img.size:
            pos = img[img > max(float(img.max()) * 1e-6, 1e-3)]
            if pos.size:
                lo, hi = min(lo, float(np.log10(pos.min()))), max(hi, float(np.log10(pos.max())))
    return (lo, hi) if math.isfinite(lo) else (0.0, 1.0)


def colorbar(
    d: ImageDraw.ImageDraw,
    x: int,
    y: int,
    h: int,
    lo: float,
    hi: float,
    title: str,
    *,
    palette: np.ndarray = _FIRE,
    log: bool = True,
) -> None:
    """A vertical colour bar at (x, y), ``h`` tall, labelled with the values of its ends and
    round values between (``log``: lo/hi are log10 of the values)."""
    f = font()
    d.text((x, y - FONT_SIZE - 4), title, fill="black", font=f)
    for i in range(h):
        t = 1.0 - i / max(h - 1, 1)
        d.line([(x, y + i), (x + COLORBAR_W, y + i)], fill=tuple(palette[int(t * 255)]))
    d.rectangle([x, y, x + COLORBAR_W, y + h], outline="black")
    if log:
        ticks = list(range(math.ceil(lo), math.floor(hi) + 1)) or [lo]
        while len(ticks) > 8:
            ticks = ticks[::2]
        labels = [(t, f"1e{t}" if abs(t) > 2 else _fmt(10.0**t)) for t in ticks]
    else:
        labels = [(t, _fmt(t)) for t in nice_ticks(lo, hi, 5)]
    for t, lab in labels:
        py = y + int((hi - t) / ((hi - lo) or 1.0) * h)
        d.line([(x + COLORBAR_W, py), (x + COLORBAR_W + 4, py)], fill="black")
        d.text((x + COLORBAR_W + 6, py - FONT_SIZE // 2 - 1), lab, fill="black", font=f)


def x_axis(
    d: ImageDraw.ImageDraw, x0: int, y: int, w: int, xr: tuple[float, float], label: str = "step"
) -> None:
    """A horizontal axis under a plot spanning [x0, x0 + w) for data range ``xr``."""
    f = font()
    d.line([(x0, y), (x0 + w, y)], fill="black")
    for t in nice_ticks(xr[0], xr[1], 8):
        px = x0 + int((t - xr[0]) / ((xr[1] - xr[0]) or 1.0) * w)
        d.line([(px, y), (px, y + 4)], fill="black")
        s = _fmt(t)
        d.text((px - text_width(s) // 2, y + 6), s, fill="black", font=f)
    d.text((x0 + w // 2 - text_width(label) // 2, y + 8 + FONT_SIZE), label, fill="black", font=f)


def _x_range(store: RunStore) -> tuple[float, float]:
    steps = store.current.steps
    return (float(steps[0]) - 0.5, float(steps[-1]) + 0.5) if steps.size else (0.0, 1.0)


def strips_layout(store: RunStore, width: int = 800, strip: int = 44) -> dict[str, Any]:
    """Where ``strips_image`` puts things: label column, plot box, one row per module (tests
    read it to find each label)."""
    run = store.current
    kind = store.kind
    mods = [m for m in run.modules if run.lod(m, kind) is not None]
    labels, folded = labels_for(mods)
    label_w = max([text_width(s) for s in labels] + [40]) + 2 * PAD
    title_h = 2 * (FONT_SIZE + 6) + PAD
    return {
        "mods": mods,
        "labels": labels,
        "folded": folded,
        "label_w": label_w,
        "plot": (label_w, title_h, width, strip * max(len(mods), 1)),
        "rows": [(title_h + i * strip, strip) for i in range(len(mods))],
    }


def strips_image(store: RunStore, width: int = 800, strip: int = 44) -> Image.Image:
    run = store.current
    kind = store.kind
    ymap = run.ymap(kind, store.yscale)
    xr = _x_range(store)
    lo, hi = run.value_range(kind)
    yr = (float(ymap.fwd(lo)), float(ymap.fwd(hi)))
    lay = strips_layout(store, width, strip)
    x0, y0, w, h = lay["plot"]
    bar_w = 90
    canvas = Image.new("RGB", (x0 + w + PAD + bar_w, y0 + h + 2 * FONT_SIZE + 24), "white")
    d = ImageDraw.Draw(canvas)
    f = font()
    d.text(
        (PAD, PAD),
        f"{run.name}: {kind} per layer (input at top), value {lo:.3g} … {hi:.3g} "
        f"({ymap.scale} axis per strip)",
        fill="black",
        font=f,
    )
    if lay["folded"]:
        d.text((PAD, PAD + FONT_SIZE + 6), f"… = {lay['folded']}", fill="black", font=f)
    imgs = [run.lods[(m, kind)].render(xr, yr, w, strip - 2, ymap) for m in lay["mods"]]
    clo, chi = _count_range(imgs)
    for (top, sh), img, label in zip(lay["rows"], imgs, lay["labels"], strict=True):
        canvas.paste(Image.fromarray(shade(np.flipud(img), clo, chi)), (x0, top))
        d.text(
            (x0 - PAD - text_width(label), top + sh // 2 - FONT_SIZE // 2 - 1),
            label,
            fill="black",
            font=f,
        )
    x_axis(d, x0, y0 + h, w, xr)
    colorbar(d, x0 + w + PAD, y0 + FONT_SIZE + 6, max(min(h, 240) - 20, 60), clo, chi, "count")
    return canvas


def detail_image(
    store: RunStore, width: int = 800, height: int = 300, cursor_step: int | None = None
) -> Image.Image:
    run = store.current
    kind, module = store.kind, store.module
    ymap = run.ymap(kind, store.yscale)
    xr = _x_range(store)
    lo, hi = run.value_range(kind, module)
    yr = (float(ymap.fwd(lo)), float(ymap.fwd(hi)))
    ticks = ymap.ticks(*yr) or [(float(y), f"{y:.3g}") for y in np.linspace(yr[0], yr[1], 5)]
    tick_w = max(text_width(s) for _, s in ticks) + 2 * PAD
    x0, y0 = tick_w + FONT_SIZE + 4, FONT_SIZE + 2 * PAD
    bar_w = 90
    canvas = Image.new("RGB", (x0 + width + PAD + bar_w, y0 + height + 2 * FONT_SIZE + 24), "white")
    d = ImageDraw.Draw(canvas)
    f = font()
    name = module_label(module) if module is not None else "(no module)"
    d.text((PAD, PAD), f"{run.name}: {name} · {kind} over steps", fill="black", font=f)
    lod = run.lod(module, kind) if module is not None else None
    img = lod.render(xr, yr, width, height, ymap) if lod is not None else np.zeros((height, width))
    clo, chi = _count_range([img])
    canvas.paste(Image.fromarray(shade(np.flipud(img), clo, chi)), (x0, y0))
    d.line([(x0 - 1, y0), (x0 - 1, y0 + height)], fill="black")
    for y, label in ticks:
        py = y0 + int((yr[1] - y) / ((yr[1] - yr[0]) or 1.0) * height)
        if y0 <= py <= y0 + height:
            d.line([(x0 - 5, py), (x0 - 1, py)], fill="black")
            d.text(
                (x0 - 7 - text_width(label), py - FONT_SIZE // 2 - 1), label, fill="black", font=f
            )
    d.text((PAD, y0 + height // 2), "value", fill="black", font=f)
    if cursor_step is not None:
        px = x0 + int((cursor_step - xr[0]) / (xr[1] - xr[0]) * width)
        d.line([(px, y0), (px, y0 + height)], fill=(80, 200, 255), width=2)
    x_axis(d, x0, y0 + height, width, xr)
    colorbar(d, x0 + width + PAD, y0 + FONT_SIZE + 6, max(height - 40, 60), clo, chi, "count")
    return canvas


def heatmap_image(store: RunStore, width: int = 800, row: int = 24) -> Image.Image:
    mods, steps, z = store.current.heatmap(store.stat, store.kind)
    labels, folded = labels_for(mods)
    label_w = max([text_width(s) for s in labels] + [40]) + 2 * PAD
    y0 = 2 * (FONT_SIZE + 6) + PAD
    h = row * max(len(mods), 1)
    bar_w = 110
    canvas = Image.new("RGB", (label_w + width + PAD + bar_w, y0 + h + 2 * FONT_SIZE + 24), "white")
    d = ImageDraw.Draw(canvas)
    f = font()
    log = store.stat in ("rms", "std", "absmax", "l2")
    what = f"log10 {store.stat}" if log else store.stat
    d.text(
        (PAD, PAD),
        f"{store.current.name}: {store.kind} · {what} by layer and step",
        fill="black",
        font=f,
    )
    if folded:
        d.text((PAD, PAD + FONT_SIZE + 6), f"… = {folded}", fill="black", font=f)
    lo, hi = 0.0, 1.0
    if mods:
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.log10(np.abs(z)) if log else z
        fin = np.isfinite(v)
        lo, hi = (float(v[fin].min()), float(v[fin].max())) if fin.any() else (0.0, 1.0)
        t = np.where(fin, (v - lo) / ((hi - lo) or 1), 0)
        rgb = _BMY[np.clip((t * 255).astype(int), 0, 255)]
        rgb[~fin] = 200
        im = Image.fromarray(rgb).resize((width, h), Image.NEAREST)
        canvas.paste(im, (label_w, y0))
        for i, label in enumerate(labels):
            d.text(
                (label_w - PAD - text_width(label), y0 + i * row + row // 2 - FONT_SIZE // 2 - 1),
                label,
                fill="black",
                font=f,
            )
    xr = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5) if len(steps) else (0.0, 1.0)
    x_axis(d, label_w, y0 + h, width, xr)
    colorbar(
        d, label_w + width + PAD, y0 + FONT_SIZE + 6, max(min(h, 240) - 20, 60), lo, hi, what,
        palette=_BMY, log=False,
    )  # fmt: skip
    return canvas


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def distribution_frame(
    store: RunStore, step: int, width: int = 800, height: int = 220
) -> Image.Image:
    """One animation frame: the histogram over time with a cursor, and the distribution of the
    overlaid layers at ``step`` below it, with a legend of their full names."""
    top = detail_image(store, width, 200, cursor_step=step)
    run = store.current
    kind = store.kind
    ymap = run.ymap(kind, store.yscale)
    lo, hi = run.value_range(kind)
    yr = (float(ymap.fwd(lo)), float(ymap.fwd(hi)))
    mods = list(store.overlay[:5])
    labels, folded = labels_for(mods)
    legend_h = (FONT_SIZE + 5) * (len(mods) + (1 if folded else 0)) + PAD
    x0 = 60
    bottom = Image.new("RGB", (top.width, height + legend_h + 2 * FONT_SIZE + 30), "white")
    d = ImageDraw.Draw(bottom)
    f = font()
    d.text((PAD, 4), f"{kind} distribution at step {step}", fill="black", font=f)
    curves = [(m, *run.distribution(m, kind, step, ymap, yr, width // 2)) for m in mods]
    ymax = max([float(c[2].max()) for c in curves if c[2].size] + [1e-9])
    py0 = FONT_SIZE + 12
    d.rectangle([x0, py0, x0 + width, py0 + height], outline="black")
    for i, (_, x, fr) in enumerate(curves):
        px = x0 + (x - yr[0]) / (yr[1] - yr[0]) * width
        py = py0 + height - fr / ymax * (height - 10)
        d.line(list(zip(px.tolist(), py.tolist(), strict=True)), fill=COLOURS[i], width=2)
    for t in nice_ticks(0.0, ymax, 4):
        yy = py0 + height - int(t / ymax * (height - 10))
        d.text((PAD, yy - FONT_SIZE // 2), f"{t:.2g}", fill="black", font=f)
    for y, label in ymap.ticks(*yr):
        px = x0 + int((y - yr[0]) / (yr[1] - yr[0]) * width)
        d.line([(px, py0 + height), (px, py0 + height + 4)], fill="black")
        d.text((px - text_width(label) // 2, py0 + height + 6), label, fill="black", font=f)
    ly = py0 + height + FONT_SIZE + 14
    d.text((x0 + width // 2 - 20, ly - 2), "value", fill="black", font=f)
    ly += FONT_SIZE + 6
    for i, label in enumerate(labels):
        d.line([(x0, ly + 7), (x0 + 24, ly + 7)], fill=COLOURS[i], width=3)
        d.text((x0 + 30, ly), label, fill="black", font=f)
        ly += FONT_SIZE + 5
    if folded:
        d.text((x0, ly), f"… = {folded}", fill="black", font=f)
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


def _png_uri(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_REPORT_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #111; }
h1 { font-size: 20px; } p { margin: 4px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 12px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
img { display: block; margin: 16px 0; max-width: 100%; }
.warn { color: #b00020; font-weight: bold; }
"""


def html_report(store: RunStore, path: str) -> None:
    """A static report: text, the health table and the images inline. No script runs, nothing is
    fetched (``Content-Security-Policy`` forbids it), every trace string is escaped."""
    from .views import fmt_health

    run = store.current
    t = run.trace
    steps = run.steps
    parts = [
        f"<h1>{html_text(run.name)}</h1>",
        f"<p>{t.table.num_rows:,} rows · {steps.size:,} steps"
        + (f" ({int(steps[0])} … {int(steps[-1])})" if steps.size else "")
        + f" · {len(run.modules)} modules · kinds: {html_text(', '.join(run.kinds))}</p>",
    ]
    if t.truncated:
        parts.append('<p class="warn">the file ends in a torn batch: complete batches shown</p>')
    bad = run.first_nonfinite()
    if bad is not None:
        parts.append(
            f'<p class="warn">first NaN/Inf: step {int(bad["step"])}, module '
            f"{html_text(module_label(bad['module']))} ({html_text(bad['kind'])}: "
            f"{int(bad['nan_count'])} NaN, {int(bad['inf_count'])} Inf)</p>"
        )
    parts.append(fmt_health(run.health()).to_html(index=False, escape=True, border=0))
    for im, alt in (
        (strips_image(store), "every layer over the steps"),
        (detail_image(store), "the selected module over the steps"),
        (heatmap_image(store), "statistic by layer and step"),
    ):
        parts.append(f'<img alt="{html_text(alt)}" src="{_png_uri(im)}">')
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>dnntrace report: {html.escape(run.name)}</title>"
        f"<style>{_REPORT_CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


def export(store: RunStore, out: str, *, view: str = "overview", fps: float = 5.0, **_: Any) -> str:
    """Write ``out``; the format follows the extension. Returns the path written. ``fps``: frames
    per second of a GIF or MP4 (a GIF stores each frame's delay in 10 ms units)."""
    ext = os.path.splitext(out)[1].lower()
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if ext == ".png":
        im = {"overview": strips_image, "detail": detail_image, "heatmap": heatmap_image}[view](
            store
        )
        im.save(out)
    elif ext in (".gif", ".mp4"):
        import imageio.v2 as iio

        frames = animation_frames(store)
        if ext == ".gif":
            # imageio's Pillow plugin takes the per-frame duration in milliseconds
            iio.mimsave(out, frames, duration=1000.0 / fps, loop=0)
        else:
            h, w = frames[0].shape[:2]
            frames = [f[: h - h % 2, : w - w % 2] for f in frames]  # yuv420p: even sizes
            iio.mimsave(out, frames, fps=fps, macro_block_size=1)
    elif ext == ".html":
        html_report(store, out)
    else:
        raise ValueError(f"cannot export to {out!r}: use .png, .gif, .mp4 or .html")
    return out


__all__ = ["animation_frames", "export", "labels_for", "shade", "strips_layout"]
