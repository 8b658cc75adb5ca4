"""Level of detail for histograms over time: one summed-area table per (module, kind) series.

For a series with steps ``s_0 < ... < s_{n-1}`` and value columns ``c_0 < ... < c_{m-1}`` (the
log-linear buckets that hold anything in the run, plus one column for zeros and underflow and one
each for the overflow tails), ``sat[i, j]`` is the number of values with step index ``< i`` and
column ``< j`` (float64, exact below 2**53). Counts inside a cell are taken as uniform over the
cell's step span and over the column's extent on the display axis, so the number of values inside
any rectangle is four bilinear lookups; a W x H image costs O(W * H) whatever the zoom, the trace
size or the number of points the histograms stand for.

The tables are cached beside the trace (``<trace>.lod/``, one .npy per array, memory-mapped on
open) and rebuilt when the trace's size or modification time changes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dnntrace.storage import Layout, Trace
from dnntrace.storage import kinds as K
from dnntrace.storage.files import sidecar

from .sidecar import Sidecar, in_temp

LOD_VERSION = 2  # 2: the sidecar layout (signature.json, tables/)
Progress = Callable[[int, int, str], None]


# ---- display axis ---------------------------------------------------------------------------
@dataclass(frozen=True)
class YMap:
    """Value <-> display coordinate. ``symlog``: ``sign(v) * log10(1 + |v| / linthresh)``,
    linear within about ``±linthresh``, logarithmic outside; ``linear``: the identity."""

    scale: str = "symlog"
    linthresh: float = 1e-6

    def fwd(self, v: np.ndarray | float) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        if self.scale == "linear":
            return v.copy()
        return np.sign(v) * np.log10(1.0 + np.abs(v) / self.linthresh)

    def inv(self, y: np.ndarray | float) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self.scale == "linear":
            return y.copy()
        return np.sign(y) * self.linthresh * (10.0 ** np.minimum(np.abs(y), 300) - 1.0)

    def ticks(self, lo: float, hi: float) -> list[tuple[float, str]]:
        """Tick positions (display units) with value labels: 0 and ±powers of ten."""
        if self.scale == "linear":
            return []
        out = [(0.0, "0")]
        e0 = math.floor(math.log10(self.linthresh))
        for e in range(e0 + 1, e0 + 80):  # ±linthresh itself sits too close to 0
            v = 10.0**e
            y = float(self.fwd(v))
            if y > max(abs(lo), abs(hi)) + 1:
                break
            label = f"1e{e}" if e not in (0, 1, -1) else f"{v:g}"
            out += [(y, label), (-y, "-" + label)]
        has_zero = lo <= 0.0 <= hi
        rest = [t for t in out[1:] if lo <= t[0] <= hi]
        step = 1
        while len(rest) / step > 12:  # keep it legible: every n-th decade
            step += 1
        rest = [t for i, t in enumerate(rest) if (i // 2) % step == 0]
        ticks = ([out[0]] if has_zero else []) + rest
        if len(ticks) < 3:  # zoomed inside a decade: evenly spaced, labelled with the value
            ticks = [(float(y), f"{float(self.inv(y)):.3g}") for y in np.linspace(lo, hi, 5)]
        return ticks


def choose_linthresh(mids: np.ndarray, weights: np.ndarray, floor: float) -> float:
    """A power of ten at or below the 0.5 % quantile of the non-zero magnitudes (column
    midpoints ``mids`` holding ``weights`` values): everything above it is on the log part of the
    axis, so magnitudes spanning many decades stay readable."""
    mag = np.abs(mids)
    keep = (mag > floor * 2) & (weights > 0)
    if not keep.any():
        return 1.0
    order = np.argsort(mag[keep])
    cum = np.cumsum(weights[keep][order])
    q = mag[keep][order][np.searchsorted(cum, 0.005 * cum[-1])]
    return float(10.0 ** math.floor(math.log10(max(q, floor))))


# ---- one series -----------------------------------------------------------------------------
@dataclass
class SeriesLOD:
    steps: np.ndarray  # (n,) int64 ascending
    edges: np.ndarray  # (m + 1,) float64 ascending value edges of the columns
    sat: np.ndarray  # (n + 1, m + 1) float64 summed-area table

    @property
    def step_edges(self) -> np.ndarray:
        s = self.steps.astype(np.float64)
        if s.size == 1:
            return np.array([s[0] - 0.5, s[0] + 0.5])
        mid = 0.5 * (s[:-1] + s[1:])
        return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])

    @property
    def col_totals(self) -> np.ndarray:
        return np.diff(np.asarray(self.sat[-1]))

    def step_cdf(self, i: int) -> np.ndarray:
        """Cumulative counts over the columns at step index ``i`` (length m + 1)."""
        return np.asarray(self.sat[i + 1]) - np.asarray(self.sat[i])

    def render(
        self,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        width: int,
        height: int,
        ymap: YMap,
    ) -> np.ndarray:
        """Values per pixel, shape (height, width), row 0 at ``y_range[0]``."""
        xq = np.linspace(x_range[0], x_range[1], width + 1)
        yq = np.linspace(y_range[0], y_range[1], height + 1)
        ix, fx = _frac_index(self.step_edges, xq)
        iy, fy = _frac_index(ymap.fwd(self.edges), yq)
        # bilinear interpolation is separable: interpolate along the axis that shrinks the table
        # most first (half the gathers of the four-corner form for large images)
        sat = self.sat
        n1, m1 = sat.shape
        if (width + 1) * m1 <= n1 * (height + 1):
            rows = sat[ix] * (1 - fx)[:, None] + sat[ix + 1] * fx[:, None]  # (W+1, m+1)
            g = rows[:, iy] * (1 - fy) + rows[:, iy + 1] * fy
        else:
            cols = sat[:, iy] * (1 - fy) + sat[:, iy + 1] * fy  # (n+1, H+1)
            g = cols[ix] * (1 - fx)[:, None] + cols[ix + 1] * fx[:, None]
        img = np.diff(np.diff(g, axis=0), axis=1)  # (width, height)
        return np.maximum(img, 0.0).T

    def quantiles(self, qs: np.ndarray) -> np.ndarray:
        """(n, len(qs)) value quantiles per step, linear inside a column; NaN for empty steps."""
        sat = np.asarray(self.sat)
        rows = np.diff(sat, axis=0)  # (n, m + 1) cumulative per step
        total = rows[:, -1]
        out = np.full((rows.shape[0], len(qs)), np.nan)
        e = self.edges
        for k, q in enumerate(qs):
            target = q * total
            j = np.clip((rows < target[:, None]).sum(axis=1) - 1, 0, len(e) - 2)
            r = np.arange(rows.shape[0])
            lo, hi = rows[r, j], rows[r, j + 1]
            f = np.where(hi > lo, (target - lo) / np.where(hi > lo, hi - lo, 1), 0.5)
            out[:, k] = np.where(total > 0, e[j] + np.clip(f, 0, 1) * (e[j + 1] - e[j]), np.nan)
        return out


def _frac_index(edges: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the cell ``j`` of ``edges`` it falls in and the fraction inside it;
    queries outside the edges clamp to the ends (the cumulative is flat there)."""
    n = edges.size - 1
    j = np.clip(np.searchsorted(edges, q, side="right") - 1, 0, n - 1)
    lo, hi = edges[j], edges[j + 1]
    width = hi - lo
    f = np.where(width > 0, (q - lo) / np.where(width > 0, width, 1.0), 0.0)
    return j, np.clip(f, 0.0, 1.0)


# ---- building ---------------------------------------------------------------------------------
def extended_edges(lay: Layout) -> np.ndarray:
    """Edges of the extended columns: overflow-, the negative buckets, [zeros and underflow],
    the positive buckets, overflow+ (the overflow columns span one octave past the window)."""
    e = lay.edges()  # bins + 2 values: negative window, the gap around 0, positive window
    top = -e[0]
    return np.concatenate([[-2 * top], e, [2 * top]])


def series_keys(table: pa.Table) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Series code per row (-1 for scalar rows and eval rows) and the (module, kind) per code."""
    mod = table.column("module").cast(pa.string())
    kind = table.column("kind").cast(pa.string())
    phase = table.column("phase").cast(pa.string())
    key = pc.binary_join_element_wise(mod, kind, "\x00")
    keep = pc.and_(pc.not_equal(kind, K.SCALAR), pc.not_equal(phase, "eval"))
    key = pc.if_else(keep, key, pa.scalar(None, pa.string()))
    enc = pc.dictionary_encode(key).combine_chunks()
    codes = enc.indices.to_numpy(zero_copy_only=False)
    codes = np.where(enc.is_null().to_numpy(zero_copy_only=False), -1, codes).astype(np.int64)
    labels = [tuple(s.split("\x00", 1)) for s in enc.dictionary.to_pylist()]
    return codes, labels  # type: ignore[return-value]


class _Columns:
    """The table's columns as numpy arrays, extracted once for all series. The histograms stay
    in their record batches' buffers (zero-copy views, one per batch): joining them would copy
    every bucket count of the trace (~360 MB and 1 s at 10^9 points)."""

    def __init__(self, table: pa.Table) -> None:
        self.chunk_vals: list[np.ndarray] = []
        self.chunk_buckets: list[np.ndarray] = []
        chunk_of, starts, lengths = (
            [np.zeros(0, np.int64)],
            [np.zeros(0, np.int64)],
            [np.zeros(0, np.int64)],
        )
        hist, buckets = table.column("hist"), table.column("hist_bucket")
        if [len(c) for c in hist.chunks] != [len(c) for c in buckets.chunks]:  # (not from a file)
            hist = pa.chunked_array([hist.combine_chunks()])
            buckets = pa.chunked_array([buckets.combine_chunks()])
        # (the reader checked that each row's two lists have one length: check_histograms)
        for k, (chunk, bucket) in enumerate(zip(hist.chunks, buckets.chunks, strict=True)):
            offs = chunk.offsets.to_numpy().astype(np.int64)
            self.chunk_vals.append(chunk.flatten().to_numpy(zero_copy_only=False))
            self.chunk_buckets.append(bucket.flatten().to_numpy(zero_copy_only=False))
            chunk_of.append(np.full(len(chunk), k, np.int64))
            starts.append(offs[:-1] - offs[0])
            lengths.append(np.diff(offs))
        self.chunk_of = np.concatenate(chunk_of)
        self.starts = np.concatenate(starts)
        self.lengths = np.concatenate(lengths)
        self.step = table.column("step").to_numpy()

        def num(name: str) -> np.ndarray:
            return table.column(name).to_numpy().astype(np.float64)

        self.zero_like = num("zero_count") + num("underflow_pos_count") + num("underflow_neg_count")
        self.over_neg = num("overflow_neg_count")
        self.over_pos = num("overflow_pos_count")


def build_series(cols: _Columns, rows: np.ndarray, lay: Layout) -> SeriesLOD:
    """The summed-area table of the given rows (all of one series).

    Each row's (bucket, count) pairs are added into a dense steps x columns matrix, a row at a
    time: one pass over the stored pairs."""
    steps, step_idx = np.unique(cols.step[rows], return_inverse=True)
    p = lay.per_sign
    ncol = 2 * p + 3  # overflow-, p negative buckets, zeros and underflow, p positive, overflow+
    n = steps.size
    full = np.zeros((n, ncol))
    for r, si in zip(rows.tolist(), step_idx.tolist(), strict=True):
        length = int(cols.lengths[r])
        if length == 0:
            continue
        s0, k = int(cols.starts[r]), cols.chunk_of[r]
        v = cols.chunk_vals[k][s0 : s0 + length]
        b = cols.chunk_buckets[k][s0 : s0 + length].astype(np.int64)
        # buckets below p sit at column bucket + 1, the others at + 2
        np.add.at(full[si], b + 1 + (b >= p), v)
    for col, w in ((p + 1, cols.zero_like), (0, cols.over_neg), (ncol - 1, cols.over_pos)):
        full[:, col] += np.bincount(step_idx, weights=w[rows], minlength=n)
    used: np.ndarray = np.asarray((full > 0).any(axis=0))
    ext = extended_edges(lay)
    if not used.any():
        used[p + 1] = True
    cols_used = np.flatnonzero(used)
    edges = np.unique(np.concatenate([ext[cols_used], ext[cols_used + 1]]))
    compact = np.searchsorted(edges, ext[:-1])  # column of each used ext column (others unused)
    m = edges.size - 1
    sat = np.zeros((n + 1, m + 1))
    sat[1:, 1:][:, compact[cols_used]] = full[:, cols_used]
    np.cumsum(sat[1:, 1:], axis=0, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    return SeriesLOD(steps=steps.astype(np.int64), edges=edges, sat=sat)


def build_all(trace: Trace, progress: Progress | None = None) -> dict[tuple[str, str], SeriesLOD]:
    codes, labels = series_keys(trace.table)
    out: dict[tuple[str, str], SeriesLOD] = {}
    lay = trace.layout
    cols = _Columns(trace.table)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(labels) + 1))
    # numpy releases the GIL in the heavy parts: two threads use both cores
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        futures = [
            pool.submit(build_series, cols, order[bounds[i] : bounds[i + 1]], lay)
            for i in range(len(labels))
        ]
        for i, (label, fut) in enumerate(zip(labels, futures, strict=True)):
            if progress is not None:
                progress(i, len(labels), f"{label[0] or '<root>'} {label[1]}")
            out[label] = fut.result()
    if progress is not None:
        progress(len(labels), len(labels), "done")
    return out


# ---- cache ------------------------------------------------------------------------------------
def cache_dir(path: str) -> str:
    return sidecar(path, "lod")


def _sidecar(path: str) -> Sidecar:
    return Sidecar(path, [cache_dir(path), in_temp(path, "dnntrace-lod")], LOD_VERSION)


def load_cache(path: str) -> dict[tuple[str, str], SeriesLOD] | None:
    """The cached tables if they match the trace's size and mtime, memory-mapped; else None."""
    try:
        d = _sidecar(path).find("tables")
        if d is None:
            return None
        with open(os.path.join(d, "index.json")) as f:
            index = json.load(f)
        out = {}
        for i, (mod, kind) in enumerate(index["series"]):
            arrs = [
                np.load(os.path.join(d, f"{i}.{a}.npy"), mmap_mode="r")
                for a in ("steps", "edges", "sat")
            ]
            out[(mod, kind)] = SeriesLOD(np.asarray(arrs[0]), np.asarray(arrs[1]), arrs[2])
        return out
    except (OSError, ValueError, KeyError):
        return None


def save_cache(path: str, lods: dict[tuple[str, str], SeriesLOD]) -> bool:
    """Write the cache beside the trace, else in the temp folder (whole or not at all:
    ``sidecar``); False if neither is writable."""

    def fill(tmp: str) -> None:
        series = []
        for i, (key, lod) in enumerate(lods.items()):
            series.append(list(key))
            np.save(os.path.join(tmp, f"{i}.steps.npy"), lod.steps)
            np.save(os.path.join(tmp, f"{i}.edges.npy"), lod.edges)
            np.save(os.path.join(tmp, f"{i}.sat.npy"), np.asarray(lod.sat))
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump({"series": series}, f)

    try:
        return _sidecar(path).write("tables", fill) is not None
    except OSError:  # the trace itself gone (stat)
        return False


def open_lods(
    trace: Trace, *, use_cache: bool = True, progress: Progress | None = None
) -> tuple[dict[tuple[str, str], SeriesLOD], bool]:
    """(tables, from_cache): the cache when valid, else built (and cached when possible)."""
    if use_cache:
        cached = load_cache(trace.path)
        if cached is not None:
            return cached, True
    lods = build_all(trace, progress)
    if use_cache and not trace.truncated:
        save_cache(trace.path, lods)
    return lods, False
