"""Per-unit rows of a trace as arrays: units × steps matrices and their level-of-detail pyramid,
dead and saturated units over a window, attribution totals, the anomaly timeline, top-k lists.
Reads files through ``dnntrace.storage`` only (no torch). No browser needed.

Definitions (shown in the views):

- a unit is **dead** at step ``s`` when its ``unit_firing`` was 0 at every recorded step of the
  window of the last ``window`` recorded steps ending at ``s`` (needs a full window);
- a unit is **saturated** at ``s`` when its ``unit_saturated`` fraction was ``>= threshold``
  (0.99) at every recorded step of that window;
- a layer's attribution total at a step is the sum over its units of ``unit_attr`` (signed) and of
  ``unit_attr_abs``.

Out of core. A (module, kind) matrix is built by streaming its rows (one per recorded step, in
step order) through a fixed-size block of ``CHUNK_CELLS`` cells: each block is written to level 0
and halved into the next level on the way, so the whole pyramid costs one pass over the rows and
memory of a few blocks, whatever the trace size. Arrays are stored **steps × units** (a row as it
arrives is one contiguous write; a window is a few contiguous unit runs per step) and shown as
units × steps through transposed views. Dead and saturated maps are built the same way from the
rows (a rolling window count per block, carried across blocks), with their per-step fractions.

Matrices of at least ``MIN_CACHE_CELLS`` cells are cached as memory-mapped ``.npy`` files beside
the trace (``<trace>.units/``, one folder per matrix), invalidated when the trace's size,
modification time or row count changes. A folder that cannot be written falls back to the
system temp folder, then to memory; a failed or full-disk build never reaches the viewer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dnntrace.storage import Trace, load
from dnntrace.storage import kinds as K
from dnntrace.storage.files import sidecar
from dnntrace.storage.kinds import UNIT_KINDS, tensor_rows

from .sidecar import Sidecar, in_temp

DEAD_WINDOW = 5
SATURATED_THRESHOLD = 0.99
CACHE_VERSION = 1
CHUNK_CELLS = 1 << 23  # cells per streamed block: 32 MB of float32
MIN_CACHE_CELLS = 1 << 20  # smaller matrices are built in memory (milliseconds)
MIN_SIDE = 64

Alloc = Callable[[str, tuple[int, ...], Any], np.ndarray]


def as_trace(store: Any) -> Trace:
    """A ``Trace`` from a path, a ``Trace``, or a viewer store (its current run)."""
    if isinstance(store, Trace):
        return store
    if isinstance(store, str | os.PathLike):
        return load(store)
    run = getattr(store, "current", None)
    if run is not None and hasattr(run, "trace"):
        trace: Trace = run.trace
        return trace
    raise TypeError(f"expected a trace path, a Trace or a RunStore, got {type(store).__name__}")


@dataclass
class UnitMatrix:
    """``values[unit, step index]`` of one (module, kind), ``steps`` ascending. ``values`` may be
    a transposed view of a memory-mapped steps × units array: index it, do not copy it whole."""

    module: str
    kind: str
    steps: np.ndarray
    values: np.ndarray

    @property
    def units(self) -> int:
        return int(self.values.shape[0])


# ---- pyramid ----------------------------------------------------------------------------------
def halve(a: np.ndarray, how: str = "mean") -> np.ndarray:
    """2 × 2 blocks of ``a`` reduced to one cell (float32): the mean of their finite cells (NaN
    when none is), or with ``how="max"`` the largest (NaN ignored). An odd last row or column is
    paired with NaN."""
    a = np.asarray(a, dtype=np.float32)
    h, w = a.shape
    if h % 2 or w % 2:
        p = np.full((h + h % 2, w + w % 2), np.nan, np.float32)
        p[:h, :w] = a
        a = p
    if how == "max":
        r = np.fmax(a[0::2], a[1::2])
        out: np.ndarray = np.fmax(r[:, 0::2], r[:, 1::2])
        return out
    fin = np.isfinite(a)
    z = np.where(fin, a, np.float32(0))
    zr = z[0::2] + z[1::2]
    del z
    fr = fin[0::2].view(np.uint8) + fin[1::2].view(np.uint8)
    s: np.ndarray = zr[:, 0::2] + zr[:, 1::2]
    n = (fr[:, 0::2] + fr[:, 1::2]).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(s, n, out=s)
    return s


def level_shapes(shape: tuple[int, int], min_side: int = MIN_SIDE) -> list[tuple[int, int]]:
    """Shapes of the pyramid's levels: halved (rounding up) until no side exceeds ``min_side``."""
    out = [(int(shape[0]), int(shape[1]))]
    while max(out[-1]) > min_side:
        h, w = out[-1]
        out.append(((h + 1) // 2, (w + 1) // 2))
    return out


def memory_alloc(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.empty(shape, dtype)


class PyramidBuilder:
    """Level 0 rows pushed in order, in blocks of any size; each level keeps at most one row
    waiting for its pair, so every level is written as the rows arrive."""

    def __init__(
        self,
        shape: tuple[int, int],
        how: str = "mean",
        alloc: Alloc = memory_alloc,
        dtype: Any = np.float32,
        min_side: int = MIN_SIDE,
    ) -> None:
        self.how = how
        self.shapes = level_shapes(shape, min_side)
        self.levels = [
            alloc(f"L{i}", s, dtype if i == 0 else np.float32) for i, s in enumerate(self.shapes)
        ]
        self._pos = [0] * len(self.shapes)
        self._carry: list[np.ndarray | None] = [None] * len(self.shapes)

    def push(self, rows: np.ndarray, level: int = 0) -> None:
        r = rows.shape[0]
        if r == 0:
            return
        p = self._pos[level]
        self.levels[level][p : p + r] = rows
        self._pos[level] = p + r
        if level + 1 == len(self.levels):
            return
        c = self._carry[level]
        if c is not None:
            rows = np.concatenate([c, np.asarray(rows, c.dtype)])
            self._carry[level] = None
        even = rows.shape[0] - rows.shape[0] % 2
        if even < rows.shape[0]:
            self._carry[level] = np.array(rows[even:], dtype=np.float32)
        if even:
            self.push(halve(rows[:even], self.how), level + 1)

    def close(self) -> list[np.ndarray]:
        for lvl in range(len(self.levels) - 1):
            c = self._carry[lvl]
            if c is not None:
                self._carry[lvl] = None
                self.push(halve(c, self.how), lvl + 1)
        got = [(p, s[0]) for p, s in zip(self._pos, self.shapes, strict=True) if p != s[0]]
        if got:
            raise ValueError(f"pyramid got (rows, expected) {got}")
        return self.levels


class Pyramid:
    """Halved copies of a units × steps matrix (NaN-aware mean of 2 × 2 blocks, or max), so any
    view reads at most about ``2 × width × 2 × height`` cells: the level whose cells are no
    smaller than half a pixel, cropped to the visible window. Level 0 is the matrix itself.

    ``Pyramid(values)`` builds one in memory from a units × steps array; ``Pyramid.stored`` wraps
    steps × units levels (memory-mapped or not) built by ``PyramidBuilder``."""

    def __init__(
        self, values: np.ndarray | None = None, how: str = "mean", min_side: int = MIN_SIDE
    ) -> None:
        self.how = how
        self._t: list[np.ndarray] = []
        if values is not None:
            v = np.asarray(values).T  # steps × units, as stored
            b = PyramidBuilder(v.shape, how, memory_alloc, np.float32, min_side)
            step = max(2, (CHUNK_CELLS // max(v.shape[1], 1)) & ~1)
            for i in range(0, v.shape[0], step):
                b.push(v[i : i + step])
            self._t = b.close()

    @classmethod
    def stored(cls, levels: list[np.ndarray], how: str = "mean") -> Pyramid:
        p = cls(None, how)
        p._t = list(levels)
        return p

    @property
    def levels(self) -> list[np.ndarray]:
        """Units × steps views of the levels."""
        return [a.T for a in self._t]

    @property
    def shape(self) -> tuple[int, int]:
        """(units, steps) of level 0."""
        s, u = self._t[0].shape
        return int(u), int(s)

    def window(
        self, u0: float, u1: float, i0: float, i1: float, height: int, width: int
    ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """Cells covering units ``[u0, u1)`` × step indices ``[i0, i1)`` at the coarsest level
        with at least ``height`` × ``width`` cells there; returns the array (float32, a copy)
        and its bounds (``u0, u1, i0, i1`` in level-0 coordinates, cell edges)."""
        n_u, n_s = self.shape
        u0, u1 = max(0.0, u0), min(float(n_u), u1)
        i0, i1 = max(0.0, i0), min(float(n_s), i1)
        lvl = 0
        while lvl + 1 < len(self._t):
            f = 2 ** (lvl + 1)
            if (u1 - u0) / f < height or (i1 - i0) / f < width:
                break
            lvl += 1
        f = 2**lvl
        a = self._t[lvl]  # steps × units
        r0, r1 = int(u0 // f), max(int(u0 // f) + 1, int(math.ceil(u1 / f)))
        c0, c1 = int(i0 // f), max(int(i0 // f) + 1, int(math.ceil(i1 / f)))
        r1, c1 = min(r1, a.shape[1]), min(c1, a.shape[0])
        # two cells a side where the level has them: Datashader cannot regrid a single cell
        if r1 - r0 < 2:
            r0, r1 = max(0, min(r0, a.shape[1] - 2)), min(a.shape[1], max(r0, 0) + 2)
        if c1 - c0 < 2:
            c0, c1 = max(0, min(c0, a.shape[0] - 2)), min(a.shape[0], max(c0, 0) + 2)
        out = np.array(a[c0:c1, r0:r1], dtype=np.float32).T
        return out, (r0 * f, min(r1 * f, n_u), c0 * f, min(c1 * f, n_s))


# ---- rows of one (module, kind) ------------------------------------------------------------
def _column_str(t: pa.Table, name: str) -> pa.ChunkedArray:
    col = t.column(name)
    return col.cast(pa.string()) if pa.types.is_dictionary(col.type) else col


class _Rows:
    """The train rows of one (module, kind) in step order (stable), read straight from the
    trace's record batches (zero-copy for an uncompressed, memory-mapped trace)."""

    def __init__(self, trace: Trace, module: str, kind: str) -> None:
        t = trace.table
        if t.num_rows:
            mask = pc.and_(
                pc.and_(
                    pc.equal(_column_str(t, "module"), module),
                    pc.equal(_column_str(t, "kind"), kind),
                ),
                pc.equal(_column_str(t, "phase"), "train"),
            )
            idx = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
        else:
            idx = np.zeros(0, np.int64)
        steps = t.column("step").to_numpy()[idx] if idx.size else np.zeros(0, np.int64)
        order = np.argsort(steps, kind="stable")
        self.steps = steps[order].astype(np.int64)
        idx = idx[order]
        self._chunks = t.column("values").chunks
        bounds = np.zeros(len(self._chunks) + 1, np.int64)
        np.cumsum([len(c) for c in self._chunks], out=bounds[1:])
        self._chunk = np.searchsorted(bounds, idx, side="right") - 1
        local = idx - bounds[self._chunk]
        self._start = np.zeros(idx.size, np.int64)
        self.lengths = np.zeros(idx.size, np.int64)
        for c in np.unique(self._chunk):
            arr = self._chunks[c]
            sel = np.flatnonzero(self._chunk == c)
            offs = arr.offsets.to_numpy()
            li = local[sel]
            n = offs[li + 1] - offs[li]
            if arr.null_count:
                n = np.where(arr.is_valid().to_numpy(zero_copy_only=False)[li], n, 0)
            self._start[sel] = offs[li]
            self.lengths[sel] = n
        self.units = int(self.lengths.max()) if idx.size else 0
        self._flat: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.steps.size)

    def _values(self, c: int) -> np.ndarray:
        if c not in self._flat:
            self._flat[c] = self._chunks[c].values.to_numpy(zero_copy_only=False)
        return self._flat[c]

    def block_rows(self, chunk_cells: int = CHUNK_CELLS) -> int:
        return max(2, (chunk_cells // max(self.units, 1)) & ~1)

    def blocks(self, chunk_cells: int = CHUNK_CELLS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block rows × units), NaN past a row's length."""
        n, u = len(self), self.units
        step = self.block_rows(chunk_cells)
        buf = np.empty((min(step, n), u), np.float32)
        for b0 in range(0, n, step):
            r = min(step, n - b0)
            blk = buf[:r]
            for j in range(r):
                i = b0 + j
                k = int(self.lengths[i])
                s = int(self._start[i])
                blk[j, :k] = self._values(int(self._chunk[i]))[s : s + k]
                blk[j, k:] = np.nan
            yield b0, blk
        self._flat.clear()  # drop references to the batches' buffers


def _all_window_blocks(
    blocks: Iterator[tuple[int, np.ndarray]], window: int
) -> Iterator[tuple[int, np.ndarray]]:
    """``_all_window`` over a stream of row blocks (rows = steps): each output row is True where
    the condition held at it and the ``window - 1`` rows before it (full windows only); the last
    ``window - 1`` condition rows are carried into the next block."""
    prev: np.ndarray | None = None
    for b0, cond in blocks:
        r, u = cond.shape
        out = np.zeros((r, u), bool)
        if window >= 1:
            ext = cond if prev is None else np.concatenate([prev, cond])
            p = ext.shape[0] - r
            cs = np.zeros((ext.shape[0] + 1, u), np.int32)
            np.cumsum(ext, axis=0, dtype=np.int32, out=cs[1:])
            j = np.arange(r)
            j = j[b0 + j >= window - 1]  # full windows only
            out[j] = (cs[p + j + 1] - cs[p + j + 1 - window]) == window
            prev = ext[max(0, ext.shape[0] - (window - 1)) :] if window > 1 else None
            if prev is not None:
                prev = prev.copy()
        yield b0, out


# ---- cache ------------------------------------------------------------------------------------
def cache_dir(path: str) -> str:
    return sidecar(path, "units")


def _fallback_dir(path: str) -> str:
    return in_temp(path, "dnntrace-units")


@dataclass
class Entry:
    """One cached matrix: ``levels`` steps × units (level 0 first), ``steps`` of its columns,
    ``stat`` per step (``nansum`` over units for a statistic, the fraction of units for a map)."""

    steps: np.ndarray
    stat: np.ndarray
    levels: list[np.ndarray]
    how: str
    location: str  # the folder it was loaded from, or "memory"


def _disk_alloc(folder: str) -> Alloc:
    def alloc(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if int(np.prod(shape)) == 0:
            return np.empty(shape, dtype)
        p = os.path.join(folder, name + ".npy")
        a = np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=shape)
        # reserve the blocks now: a full disk is an OSError here, not a SIGBUS on a later write
        with open(p, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(p))
        return a

    return alloc


class UnitCache:
    """Built matrices of one trace: in a folder beside it (else the temp folder, else memory)."""

    def __init__(
        self, trace: Trace, *, use_disk: bool = True, min_cells: int = MIN_CACHE_CELLS
    ) -> None:
        self.trace = trace
        self.min_cells = min_cells
        dirs = [cache_dir(trace.path), _fallback_dir(trace.path)] if use_disk else []
        self.sidecar = Sidecar(
            trace.path, dirs, CACHE_VERSION, extra={"rows": trace.table.num_rows}
        )
        self.builds = 0  # entries built (not loaded) by this object (tests)

    @property
    def dirs(self) -> list[str]:
        return self.sidecar.dirs

    @staticmethod
    def _name(key: tuple) -> str:
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:20]

    def _load(self, d: str, key: tuple) -> Entry | None:
        e = os.path.join(d, self._name(key))
        try:
            with open(os.path.join(e, "meta.json")) as f:
                meta = json.load(f)
            if meta["key"] != json.loads(json.dumps(key)):
                return None
            levels = []
            for i, shape in enumerate(meta["shapes"]):
                if int(np.prod(shape)) == 0:
                    levels.append(np.empty(shape, meta["dtypes"][i]))
                else:
                    levels.append(np.load(os.path.join(e, f"L{i}.npy"), mmap_mode="r"))
            steps = np.load(os.path.join(e, "steps.npy"))
            stat = np.load(os.path.join(e, "stat.npy"))
            return Entry(steps, stat, levels, meta["how"], d)
        except (OSError, ValueError, KeyError):
            return None

    def get(self, key: tuple, cells: int, build: Callable[[Alloc], Entry]) -> Entry:
        """The entry of ``key``: loaded when cached and valid, else built (``cells``: its
        level-0 size, to choose memory or disk)."""
        if cells > 0 and cells >= self.min_cells:
            name = self._name(key)
            for d in self.dirs:
                if self.sidecar.valid(d):
                    got = self._load(d, key)
                    if got is not None:
                        return got

            def fill(tmp: str) -> None:
                entry = build(_disk_alloc(tmp))
                self.builds += 1
                for a in entry.levels:
                    if isinstance(a, np.memmap):
                        a.flush()
                np.save(os.path.join(tmp, "steps.npy"), entry.steps)
                np.save(os.path.join(tmp, "stat.npy"), entry.stat)
                meta = {
                    "key": key,
                    "how": entry.how,
                    "shapes": [list(a.shape) for a in entry.levels],
                    "dtypes": [a.dtype.str for a in entry.levels],
                }
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump(meta, f)

            final = self.sidecar.write(name, fill)
            if final is not None:
                got = self._load(os.path.dirname(final), key)
                if got is not None:
                    return got
        entry = build(memory_alloc)
        self.builds += 1
        entry.location = "memory"
        return entry


# ---- the trace's per-unit data ----------------------------------------------------------------
@dataclass
class UnitData:
    """The per-unit rows of one trace. ``use_disk=False`` keeps every matrix in memory;
    ``min_cache_cells`` is the smallest matrix cached on disk."""

    trace: Trace
    use_disk: bool = True
    min_cache_cells: int = MIN_CACHE_CELLS
    chunk_cells: int = CHUNK_CELLS
    _cache: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store = UnitCache(self.trace, use_disk=self.use_disk, min_cells=self.min_cache_cells)

    @classmethod
    def open(cls, store: Any, **kw: Any) -> UnitData:
        return cls(as_trace(store), **kw)

    # ---- structure --------------------------------------------------------------------------
    def modules(self, kind: str = K.UNIT_MEAN) -> list[str]:
        """Modules with rows of ``kind``, in model order."""
        t = self.trace.table
        if t.num_rows == 0:
            return []
        mod = _column_str(t, "module").filter(pc.equal(_column_str(t, "kind"), kind))
        have = set(pc.unique(mod).to_pylist())
        return [m for m in self.trace.modules if m in have]

    def kinds(self) -> list[str]:
        have = set(self.trace.kinds)
        return [k for k in UNIT_KINDS if k in have]

    def _rows(self, module: str, kind: str) -> _Rows:
        key = ("rows", module, kind)
        if key not in self._cache:
            self._cache[key] = _Rows(self.trace, module, kind)
        return self._cache[key]  # type: ignore[no-any-return]

    def steps(self, module: str, kind: str) -> np.ndarray:
        """Steps of the (module, kind) matrix's columns, ascending."""
        return self._rows(module, kind).steps

    def n_units(self, module: str, kind: str) -> int:
        """Units of the (module, kind) matrix (its longest row), without building it."""
        return self._rows(module, kind).units

    # ---- matrices ---------------------------------------------------------------------------
    def _entry(self, key: tuple, module: str, kind: str, how: str, make: Callable) -> Entry:
        if key not in self._cache:
            rows = self._rows(module, kind)
            self._cache[key] = self.store.get(
                key, len(rows) * rows.units, lambda alloc: make(rows, alloc)
            )
        return self._cache[key]  # type: ignore[no-any-return]

    def _stat_entry(self, module: str, kind: str, how: str = "mean") -> Entry:
        def make(rows: _Rows, alloc: Alloc) -> Entry:
            b = PyramidBuilder((len(rows), rows.units), how, alloc)
            total = np.zeros(len(rows))
            for b0, blk in rows.blocks(self.chunk_cells):
                b.push(blk)
                if rows.units:
                    total[b0 : b0 + len(blk)] = np.nansum(blk, axis=1, dtype=np.float64)
            return Entry(rows.steps, total, b.close(), how, "")

        return self._entry(("matrix", module, kind, how), module, kind, how, make)

    def _map_entry(self, module: str, kind: str, window: int, threshold: float) -> Entry:
        def make(rows: _Rows, alloc: Alloc) -> Entry:
            b = PyramidBuilder((len(rows), rows.units), "mean", alloc, dtype=np.bool_)
            frac = np.zeros(len(rows))
            conds = (
                (b0, blk == 0 if kind == K.UNIT_FIRING else blk >= threshold)
                for b0, blk in rows.blocks(self.chunk_cells)
            )
            for b0, out in _all_window_blocks(conds, window):
                b.push(out)
                if rows.units:
                    frac[b0 : b0 + len(out)] = out.mean(axis=1)
            return Entry(rows.steps, frac, b.close(), "mean", "")

        thr = threshold if kind != K.UNIT_FIRING else None
        return self._entry(("map", module, kind, window, thr), module, kind, "mean", make)

    def matrix(self, module: str, kind: str) -> UnitMatrix:
        e = self._stat_entry(module, kind)
        return UnitMatrix(module, kind, e.steps, e.levels[0].T)

    def pyramid(self, module: str, kind: str, how: str = "mean") -> Pyramid:
        return Pyramid.stored(self._stat_entry(module, kind, how).levels, how)

    def column_sums(self, module: str, kind: str) -> np.ndarray:
        """Σ over units of the finite values, per step (float64)."""
        return self._stat_entry(module, kind).stat

    # ---- dead and saturated -----------------------------------------------------------------
    def _all_window(self, cond: np.ndarray, window: int) -> np.ndarray:
        """True where ``cond`` (units × steps) held at each of the last ``window`` columns (full
        windows only); streamed over blocks of steps, never a full int64 cumulative sum."""
        u, s = cond.shape
        out = np.zeros((u, s), bool)
        step = max(1, self.chunk_cells // max(u, 1))
        blocks = ((i, np.asarray(cond[:, i : i + step]).T) for i in range(0, s, step))
        for b0, o in _all_window_blocks(blocks, window):
            out[:, b0 : b0 + o.shape[0]] = o.T
        return out

    def dead(self, module: str, window: int = DEAD_WINDOW) -> UnitMatrix:
        e = self._map_entry(module, K.UNIT_FIRING, window, SATURATED_THRESHOLD)
        return UnitMatrix(module, "dead", e.steps, e.levels[0].T)

    def saturated(
        self, module: str, window: int = DEAD_WINDOW, threshold: float = SATURATED_THRESHOLD
    ) -> UnitMatrix:
        e = self._map_entry(module, K.UNIT_SATURATED, window, threshold)
        return UnitMatrix(module, "saturated", e.steps, e.levels[0].T)

    def map_pyramid(
        self,
        module: str,
        which: str,
        window: int = DEAD_WINDOW,
        threshold: float = SATURATED_THRESHOLD,
    ) -> tuple[np.ndarray, Pyramid]:
        """(steps, pyramid) of the ``dead`` or ``saturated`` map (1 = dead; coarser levels hold
        the fraction of dead unit-steps in the cell)."""
        kind = K.UNIT_FIRING if which == "dead" else K.UNIT_SATURATED
        e = self._map_entry(module, kind, window, threshold)
        return e.steps, Pyramid.stored(e.levels, "mean")

    def dead_fractions(
        self, window: int = DEAD_WINDOW, threshold: float = SATURATED_THRESHOLD
    ) -> pd.DataFrame:
        """Per layer and step: ``dead`` and ``saturated`` fractions of its units."""
        frames = []
        for m in self.modules(K.UNIT_FIRING):
            d = self._map_entry(m, K.UNIT_FIRING, window, threshold)
            row: dict[str, Any] = {"module": m, "step": d.steps, "dead": d.stat}
            if K.UNIT_SATURATED in self.trace.kinds:
                s = self._map_entry(m, K.UNIT_SATURATED, window, threshold)
                same = s.steps.size == d.steps.size
                row["saturated"] = s.stat if same else 0.0 if s.stat.size == 0 else np.nan
            frames.append(pd.DataFrame(row))
        cols = ["module", "step", "dead", "saturated"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)

    def dead_units(self, module: str, window: int = DEAD_WINDOW) -> list[int]:
        """Units dead at the last step."""
        d = self.dead(module, window)
        return [] if d.values.size == 0 else np.flatnonzero(d.values[:, -1]).tolist()

    # ---- attribution ------------------------------------------------------------------------
    def attribution_totals(self) -> pd.DataFrame:
        """Per layer and step: ``attr`` (Σ unit_attr) and ``attr_abs`` (Σ unit_attr_abs)."""
        frames = []
        for m in self.modules(K.UNIT_ATTR_ABS):
            steps = self.steps(m, K.UNIT_ATTR_ABS)
            signed = self.column_sums(m, K.UNIT_ATTR) if self.n_units(m, K.UNIT_ATTR) else np.nan
            frames.append(
                pd.DataFrame(
                    {
                        "module": m,
                        "step": steps,
                        "attr": signed,
                        "attr_abs": self.column_sums(m, K.UNIT_ATTR_ABS),
                    }
                )
            )
        cols = ["module", "step", "attr", "attr_abs"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)

    # ---- anomalies --------------------------------------------------------------------------
    def anomalies(self) -> pd.DataFrame:
        """One row per ``anomaly`` row (origin in execution order); without any, the reader's
        first NaN/Inf per kind (model order), marked ``source = "model order"``."""
        t = self.trace.select(kind=K.ANOMALY)
        rows = []
        for r in t.to_pylist():
            vals = K.unpack(K.ANOMALY, r["values"])  # by name; NaN for a field a row lacks
            rows.append(
                {
                    "step": r["step"] if math.isnan(vals["step"]) else int(vals["step"]),
                    "module": r["module"],
                    "direction": r["tensor"],
                    "nan_count": vals["nan_count"],
                    "inf_count": vals["inf_count"],
                    "input_min": vals["input_min"],
                    "input_max": vals["input_max"],
                    "input_rms": vals["input_rms"],
                    "source": "execution order",
                }
            )
        if not rows:
            for a in self.trace.anomalies():  # tensor kinds only (dnntrace.storage.kinds)
                rows.append(
                    {
                        "step": a["step"],
                        "module": a["module"],
                        "direction": a["kind"],
                        "nan_count": a["nan_count"],
                        "inf_count": a["inf_count"],
                        "source": "model order",
                    }
                )
        return pd.DataFrame(rows)

    def nonfinite_timeline(self) -> pd.DataFrame:
        """Per step: rows and elements with NaN/±Inf (tensor rows only)."""
        t = tensor_rows(self.trace.table)  # the same rows dnntrace info counts
        if t.num_rows == 0:
            return pd.DataFrame(columns=["step", "bad_rows", "bad_values"])
        bad = (
            t.column("nan_count").to_numpy()
            + t.column("posinf_count").to_numpy()
            + t.column("neginf_count").to_numpy()
        )
        df = pd.DataFrame({"step": t.column("step").to_numpy(), "bad": bad})
        g = df.groupby("step")["bad"]
        return pd.DataFrame(
            {"bad_rows": g.apply(lambda s: int((s > 0).sum())), "bad_values": g.sum()}
        ).reset_index()

    # ---- top-k ------------------------------------------------------------------------------
    def topk(self, module: str, unit: int) -> pd.DataFrame:
        """The latest top-k list of ``unit``: rank, value, sample id, step."""
        cols: dict[str, np.ndarray] = {}
        n_units = self.n_units(module, K.UNIT_MEAN) or None
        for kind, name in (
            (K.UNIT_TOPK_VALUE, "value"),
            (K.UNIT_TOPK_INDEX, "sample"),
            (K.UNIT_TOPK_STEP, "step"),
        ):
            t = self.trace.select(module=module, kind=kind)
            if t.num_rows == 0:
                return pd.DataFrame(columns=["rank", "value", "sample", "step"])
            last = int(np.argmax(t.column("step").to_numpy()))
            v = np.asarray(t.column("values")[last].as_py(), np.float64)
            units = n_units or len(v)
            k = len(v) // units
            cols[name] = v.reshape(units, k)[unit]
        keep = np.isfinite(cols["value"])
        df = pd.DataFrame(
            {
                "rank": np.arange(1, keep.sum() + 1),
                "value": cols["value"][keep],
                "sample": cols["sample"][keep].astype(np.int64),
                "step": cols["step"][keep].astype(np.int64),
            }
        )
        return df
