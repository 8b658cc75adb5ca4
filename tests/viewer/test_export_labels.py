"""Exported images carry every module's full name (found in the PNG by rendering the expected
text with the export's font and matching it pixel for pixel), the root's label, axes and a
colour bar; animations have the requested frame rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _traces import rewrite
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw

from dnntrace_viewer import export as E
from dnntrace_viewer.data_store import RunStore

LONG = {
    "fc0": "blocks.0.attention.query_projection",
    "act0": "blocks.0.attention.key_projection",
    "fc1": "blocks.0.dropout",
    "act1": "blocks.1.dropout",
}


def text_mask(text: str) -> np.ndarray:
    """``text`` drawn as the export draws labels, cropped to its ink, as a boolean mask."""
    w = E.text_width(text) + 8
    im = Image.new("L", (w, E.FONT_SIZE * 3), 255)
    ImageDraw.Draw(im).text((4, E.FONT_SIZE), text, fill=0, font=E.font())
    a = np.asarray(im) < 128
    ys, xs = np.nonzero(a)
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def found(img: np.ndarray, box: tuple[int, int, int, int], text: str) -> bool:
    """Whether ``text`` appears, pixel for pixel, inside ``box`` (x0, y0, x1, y1) of ``img``."""
    x0, y0, x1, y1 = box
    region = (np.asarray(Image.fromarray(img).convert("L")) < 128)[y0:y1, x0:x1]
    t = text_mask(text)
    if t.shape[0] > region.shape[0] or t.shape[1] > region.shape[1]:
        return False
    win = sliding_window_view(region, t.shape)
    return bool((win == t).all(axis=(-2, -1)).any())


@pytest.fixture(scope="module")
def long_trace(demo_trace: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return rewrite(demo_trace, tmp_path_factory.mktemp("long") / "long.arrow", rename=LONG)


def test_png_labels_are_full_names(long_trace: str, tmp_path: Path) -> None:
    store = RunStore(paths=[long_trace])
    out = tmp_path / "strips.png"
    E.export(store, str(out), view="overview")
    img = np.asarray(Image.open(out).convert("RGB"))
    lay = E.strips_layout(store)
    assert lay["folded"] == ""
    assert lay["labels"][0] == "<root>" or "" not in lay["mods"]
    names = [("<root>" if m == "" else m) for m in lay["mods"]]
    assert set(LONG.values()) <= set(names)
    for (top, h), name in zip(lay["rows"], names, strict=True):
        row = (0, top, lay["label_w"], top + h)
        assert found(img, row, name), name
    # the check can fail: a 14-character cut of a long name is not what is drawn
    (top, h), name = lay["rows"][names.index(LONG["fc0"])], LONG["fc0"]
    assert not found(img, (0, top, lay["label_w"], top + h), name[:14] + "x")
    # the two names sharing their first 14 characters are told apart in their own rows
    other = names.index(LONG["act0"])
    top, h = lay["rows"][other]
    assert not found(img, (0, top, lay["label_w"], top + h), LONG["fc0"])
    # axes and colour bar
    x0, y0, w, hh = lay["plot"]
    assert found(img, (x0, y0 + hh, x0 + w, img.shape[0]), "step")
    assert found(img, (x0 + w, 0, img.shape[1], img.shape[0]), "count")


def test_long_names_fold_their_common_prefix(demo_trace: str, tmp_path: Path) -> None:
    pre = "model.transformer.encoder.layers.stack.of.many.blocks."
    rename = {m: pre + m for m in ("fc0", "act0", "fc1", "act1", "fc2", "act2", "fc3", "act3")}
    path = rewrite(demo_trace, tmp_path / "deep.arrow", rename=rename)
    store = RunStore(paths=[path])
    lay = E.strips_layout(store)
    assert lay["folded"] == pre[: pre[:-1].rfind(".") + 1]
    assert "…blocks.fc0" in lay["labels"]
    out = tmp_path / "deep.png"
    E.export(store, str(out))
    img = np.asarray(Image.open(out).convert("RGB"))
    top, h = lay["rows"][lay["labels"].index("…blocks.act2")]
    assert found(img, (0, top, lay["label_w"], top + h), "…blocks.act2")
    assert found(img, (0, 0, img.shape[1], lay["plot"][1]), f"… = {lay['folded']}")


def test_heatmap_and_detail_have_axes_and_colorbar(long_trace: str, tmp_path: Path) -> None:
    store = RunStore(paths=[long_trace])
    store.module = "blocks.0.attention.key_projection"
    for view, bar in (("heatmap", "log10 rms"), ("detail", "count")):
        out = tmp_path / f"{view}.png"
        E.export(store, str(out), view=view)
        img = np.asarray(Image.open(out).convert("RGB"))
        whole = (0, 0, img.shape[1], img.shape[0])
        assert found(img, whole, "step") and found(img, whole, bar), view
        if view == "heatmap":
            assert found(img, whole, LONG["fc0"])
        else:
            assert found(img, whole, "value")


@pytest.mark.parametrize("fps", [4.0, 12.5])
def test_gif_frame_rate(demo_trace: str, tmp_path: Path, fps: float) -> None:
    store = RunStore(paths=[demo_trace])
    out = tmp_path / "a.gif"
    E.export(store, str(out), fps=fps)
    with Image.open(out) as im:
        durations = []
        for i in range(min(im.n_frames, 5)):
            im.seek(i)
            durations.append(im.info["duration"])
    assert durations and all(abs(d - 1000 / fps) <= 10 for d in durations), durations


# imageio-ffmpeg 0.8.1 leaves the ffmpeg subprocess pipes to the garbage collector
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_mp4_frame_rate(demo_trace: str, tmp_path: Path) -> None:
    import imageio.v2 as iio

    store = RunStore(paths=[demo_trace])
    out = tmp_path / "a.mp4"
    E.export(store, str(out), fps=8)
    with iio.get_reader(out) as r:
        assert r.get_meta_data()["fps"] == pytest.approx(8, rel=0.01)


def test_html_export_is_self_contained(long_trace: str, tmp_path: Path) -> None:
    import re

    store = RunStore(paths=[long_trace])
    out = tmp_path / "r.html"
    E.export(store, str(out))
    html = out.read_text()
    assert "<script" not in html
    refs = re.findall(r"(?:src|href)=[\"']([^\"']+)", html)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert LONG["fc0"] in html
