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
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dnntrace.storage import Trace, load
from dnntrace.storage.schema import ANOMALY_FIELDS

UNIT_KINDS = (
    "unit_mean",
    "unit_sq_mean",
    "unit_firing",
    "unit_saturated",
    "unit_max",
    "unit_grad_rms",
    "unit_attr",
    "unit_attr_abs",
)
DEAD_WINDOW = 5
SATURATED_THRESHOLD = 0.99


def as_trace(store: Any) -> Trace:
    """A ``Trace`` from a path, a ``Trace``, or a viewer store (its current run)."""
    if isinstance(store, Trace):
        return store
    if isinstance(store, str | os.PathLike):
        return load(store)
    run = getattr(store, "current", None)
    if run is not None and hasattr(run, "trace"):
        return run.trace
    raise TypeError(f"expected a trace path, a Trace or a RunStore, got {type(store).__name__}")


@dataclass
class UnitMatrix:
    """``values[unit, step index]`` (float32) of one (module, kind), ``steps`` ascending."""

    module: str
    kind: str
    steps: np.ndarray
    values: np.ndarray

    @property
    def units(self) -> int:
        return int(self.values.shape[0])


class Pyramid:
    """Halved copies of a units × steps matrix (NaN-aware mean of 2 × 2 blocks, or max), so any
    view reads at most about ``2 × width × 2 × height`` cells: the level whose cells are no
    smaller than half a pixel, cropped to the visible window. Level 0 is the matrix itself."""

    def __init__(self, values: np.ndarray, how: str = "mean", min_side: int = 64) -> None:
        self.how = how
        self.levels = [np.asarray(values, dtype=np.float32)]
        while max(self.levels[-1].shape) > min_side:
            self.levels.append(self._halve(self.levels[-1]))

    def _halve(self, a: np.ndarray) -> np.ndarray:
        h, w = a.shape
        if h % 2:
            a = np.concatenate([a, np.full((1, w), np.nan, a.dtype)])
        if w % 2:
            a = np.concatenate([a, np.full((a.shape[0], 1), np.nan, a.dtype)], axis=1)
        b = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2)
        if self.how == "max":
            return np.fmax(
                np.fmax(b[:, 0, :, 0], b[:, 0, :, 1]), np.fmax(b[:, 1, :, 0], b[:, 1, :, 1])
            )
        fin = np.isfinite(b)
        n = fin.sum(axis=(1, 3))
        s = np.where(fin, b, 0).sum(axis=(1, 3))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (s / n).astype(np.float32)

    def window(
        self, u0: float, u1: float, i0: float, i1: float, height: int, width: int
    ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """Cells covering units ``[u0, u1)`` × step indices ``[i0, i1)`` at the coarsest level
        with at least ``height`` × ``width`` cells there; returns the array and its bounds
        (``u0, u1, i0, i1`` in level-0 coordinates, cell edges)."""
        n_u, n_s = self.levels[0].shape
        u0, u1 = max(0.0, u0), min(float(n_u), u1)
        i0, i1 = max(0.0, i0), min(float(n_s), i1)
        lvl = 0
        while lvl + 1 < len(self.levels):
            f = 2 ** (lvl + 1)
            if (u1 - u0) / f < height or (i1 - i0) / f < width:
                break
            lvl += 1
        f = 2**lvl
        a = self.levels[lvl]
        r0, r1 = int(u0 // f), max(int(u0 // f) + 1, int(math.ceil(u1 / f)))
        c0, c1 = int(i0 // f), max(int(i0 // f) + 1, int(math.ceil(i1 / f)))
        r1, c1 = min(r1, a.shape[0]), min(c1, a.shape[1])
        return a[r0:r1, c0:c1], (r0 * f, min(r1 * f, n_u), c0 * f, min(c1 * f, n_s))


@dataclass
class UnitData:
    """The per-unit rows of one trace."""

    trace: Trace
    _cache: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, store: Any) -> UnitData:
        return cls(as_trace(store))

    # ---- structure --------------------------------------------------------------------------
    def modules(self, kind: str = "unit_mean") -> list[str]:
        """Modules with rows of ``kind``, in model order."""
        t = self.trace.select(kind=kind)
        have = set(t.column("module").cast(pa.string()).to_pylist()) if t.num_rows else set()
        return [m for m in self.trace.modules if m in have]

    def kinds(self) -> list[str]:
        have = set(self.trace.kinds)
        return [k for k in UNIT_KINDS if k in have]

    # ---- matrices ---------------------------------------------------------------------------
    def matrix(self, module: str, kind: str) -> UnitMatrix:
        key = ("m", module, kind)
        if key not in self._cache:
            t = self.trace.select(module=module, kind=kind, phase="train")
            steps = t.column("step").to_numpy()
            order = np.argsort(steps, kind="stable")
            vals = t.column("values").combine_chunks() if t.num_rows else None
            if vals is None or len(vals) == 0:
                m = np.zeros((0, 0), np.float32)
            else:
                offs = vals.offsets.to_numpy()
                flat = vals.values.to_numpy(zero_copy_only=False)
                n = int(np.diff(offs).max())
                m = np.full((len(steps), n), np.nan, np.float32)
                for i in range(len(steps)):
                    seg = flat[offs[i] : offs[i + 1]]
                    m[i, : seg.size] = seg
            self._cache[key] = UnitMatrix(module, kind, steps[order], m[order].T.copy())
        return self._cache[key]

    def pyramid(self, module: str, kind: str) -> Pyramid:
        key = ("p", module, kind)
        if key not in self._cache:
            self._cache[key] = Pyramid(self.matrix(module, kind).values)
        return self._cache[key]

    # ---- dead and saturated -----------------------------------------------------------------
    def _all_window(self, cond: np.ndarray, window: int) -> np.ndarray:
        """True where ``cond`` held at each of the last ``window`` columns (full windows only)."""
        u, s = cond.shape
        out = np.zeros((u, s), bool)
        if window < 1 or s < window:
            return out
        c = np.concatenate([np.zeros((u, 1), np.int64), np.cumsum(cond, axis=1)], axis=1)
        out[:, window - 1 :] = (c[:, window:] - c[:, :-window]) == window
        return out

    def dead(self, module: str, window: int = DEAD_WINDOW) -> UnitMatrix:
        f = self.matrix(module, "unit_firing")
        return UnitMatrix(module, "dead", f.steps, self._all_window(f.values == 0, window))

    def saturated(
        self, module: str, window: int = DEAD_WINDOW, threshold: float = SATURATED_THRESHOLD
    ) -> UnitMatrix:
        f = self.matrix(module, "unit_saturated")
        return UnitMatrix(
            module, "saturated", f.steps, self._all_window(f.values >= threshold, window)
        )

    def dead_fractions(
        self, window: int = DEAD_WINDOW, threshold: float = SATURATED_THRESHOLD
    ) -> pd.DataFrame:
        """Per layer and step: ``dead`` and ``saturated`` fractions of its units."""
        frames = []
        for m in self.modules("unit_firing"):
            d = self.dead(m, window)
            row = {"module": m, "step": d.steps, "dead": d.values.mean(0) if d.units else 0.0}
            if "unit_saturated" in self.trace.kinds:
                s = self.saturated(m, window, threshold)
                row["saturated"] = s.values.mean(0) if s.units else 0.0
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
        for m in self.modules("unit_attr_abs"):
            a = self.matrix(m, "unit_attr")
            b = self.matrix(m, "unit_attr_abs")
            frames.append(
                pd.DataFrame(
                    {
                        "module": m,
                        "step": b.steps,
                        "attr": np.nansum(a.values, 0) if a.units else np.nan,
                        "attr_abs": np.nansum(b.values, 0),
                    }
                )
            )
        cols = ["module", "step", "attr", "attr_abs"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)

    # ---- anomalies --------------------------------------------------------------------------
    def anomalies(self) -> pd.DataFrame:
        """One row per ``anomaly`` row (origin in execution order); without any, the reader's
        first NaN/Inf per kind (model order), marked ``source = "model order"``."""
        t = self.trace.select(kind="anomaly")
        rows = []
        for r in t.to_pylist():
            vals = dict(zip(ANOMALY_FIELDS, r["values"] or [], strict=False))
            rows.append(
                {
                    "step": int(vals.get("step", r["step"])),
                    "module": r["module"],
                    "direction": r["tensor"],
                    "nan_count": vals.get("nan_count", math.nan),
                    "inf_count": vals.get("inf_count", math.nan),
                    "input_min": vals.get("input_min", math.nan),
                    "input_max": vals.get("input_max", math.nan),
                    "input_rms": vals.get("input_rms", math.nan),
                    "source": "execution order",
                }
            )
        if not rows:
            for a in self.trace.anomalies():
                if a["kind"] in ("anomaly", "exec_order") or a["kind"].startswith("unit_"):
                    continue
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
        t = self.trace.table
        if t.num_rows == 0:
            return pd.DataFrame(columns=["step", "bad_rows", "bad_values"])
        kind = t.column("kind").cast(pa.string())
        keep = pc.invert(
            pc.or_(
                pc.starts_with(kind, "unit_"),
                pc.is_in(kind, pa.array(["anomaly", "exec_order", "scalar"])),
            )
        )
        t = t.filter(keep)
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
        n_units = self.matrix(module, "unit_mean").units or None
        for kind, name in (
            ("unit_topk_value", "value"),
            ("unit_topk_index", "sample"),
            ("unit_topk_step", "step"),
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
