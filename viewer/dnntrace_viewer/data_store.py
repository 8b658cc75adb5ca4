"""RunStore: opens runs through ``dnntrace.storage``, owns the selection, the LOD tables and the
derived frames (per-step statistics, health flags, heatmaps, distributions). No browser needed.

Health flags and their thresholds (documented in the viewer's overview, tested in tests/viewer):

- ``nan``: any NaN or ±Inf element; reports the first step and the first module in forward order.
- ``dead``: activations with a zero fraction >= ``DEAD_ZERO_FRACTION`` (0.99) at the last step.
- ``saturated``: outputs of bounded activations (Tanh, Sigmoid, Hardtanh, Softsign, Hardsigmoid)
  with >= ``SATURATED_FRACTION`` (25 %) of the values within 3 % of a bound (|y| >= 0.97 for
  tanh-like, y <= 0.03 or y >= 0.97 for sigmoid-like) at the last step.
- ``vanishing`` / ``exploding``: a module's output-gradient RMS divided by the RMS of the module
  closest to the loss (last in forward order with gradients), median over the last 10 % of the
  steps, below ``1 / GRAD_RATIO`` or above ``GRAD_RATIO`` (10**3).
- ``frozen``: every weight tensor of the module has the same sum and sum of squares at every
  recorded step (relative change <= 1e-12) over at least two steps.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param

from dnntrace.sketch import merge as SK
from dnntrace.storage import Trace, TraceError, load
from dnntrace.storage import kinds as K
from dnntrace.storage.kinds import TENSOR_KINDS, tensor_rows

from .lod import SeriesLOD, YMap, choose_linthresh, open_lods
from .paths import find_traces  # noqa: F401  (re-exported: callers import it from here)

DEAD_ZERO_FRACTION = 0.99
SATURATED_FRACTION = 0.25
SATURATION_MARGIN = K.SATURATION_MARGIN  # saturation: the one definition in storage.kinds
GRAD_RATIO = 1e3
FROZEN_RTOL = 1e-12
TANH_LIKE = {t for t in K.NONLINEARITIES if K.saturation_family(t) == "tanh"}
SIGMOID_LIKE = {t for t in K.NONLINEARITIES if K.saturation_family(t) == "sigmoid"}
QUANTILES = (0.001, 0.01, 0.25, 0.5, 0.75, 0.99, 0.999)
KINDS = TENSOR_KINDS
STATS = ("rms", "mean", "std", "absmax", "l2", "zero_frac", "nan_count", "inf_count", "min", "max")
# which rows open which of the extra tabs (the registry of row kinds, dnntrace.storage.kinds)
# which rows open which tab: the registry of row kinds
_UNIT_TAB_KINDS = K.tab_kinds("units")
_SPECTRAL_TAB_KINDS = K.tab_kinds("spectral")
_COLUMNS = [
    "step",
    "module",
    "kind",
    "phase",
    "count",
    "nan_count",
    "posinf_count",
    "neginf_count",
    "zero_count",
    "sum",
    "sumsq",
    "min",
    "max",
    "absmax",
]


def _without_histograms(trace: Trace) -> Trace:
    """The same trace, its table without the histogram columns: ``Trace``'s scans (anomalies,
    execution order) filter whole tables, and a filter copies every column it keeps (the
    histograms are most of a trace's bytes: 0.6 s of 0.65 s at 10^9 points, measured with
    format version 1's spans)."""
    drop = [c for c in ("hist_bucket", "hist") if c in trace.table.column_names]
    if not drop:
        return trace
    light = copy.copy(trace)
    light.table = trace.table.drop_columns(drop)
    return light


def _scan_without_histograms(trace: Trace) -> None:
    """Computes ``trace.execution_order`` (a cached property, kept in the instance's
    ``__dict__``) on the table without histograms: the same answer, without the copy."""
    if "execution_order" not in trace.__dict__:
        trace.__dict__["execution_order"] = _without_histograms(trace).execution_order


@dataclass
class Run:
    """One opened trace with its LOD tables and derived frames."""

    path: str
    trace: Trace
    lods: dict[tuple[str, str], SeriesLOD]
    from_cache: bool = False
    _cache: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        use_cache: bool = True,
        progress: Callable[[int, int, str], None] | None = None,
        trace: Trace | None = None,
    ) -> Run:
        """``trace``: ``path`` already loaded (the CLI loads it while Panel imports)."""
        trace = trace if trace is not None else load(path)
        _scan_without_histograms(trace)
        lods, cached = open_lods(trace, use_cache=use_cache, progress=progress)
        return cls(path=path, trace=trace, lods=lods, from_cache=cached)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def signature(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns

    def reopen(self) -> Run:
        """The run re-read from its (grown) file; tables rebuilt in memory, not cached."""
        return Run.open(self.path, use_cache=False)

    # ---- structure ----------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        """Modules with histogram rows, in forward (model) order."""
        have = {m for m, _ in self.lods}
        return [m for m in self.trace.modules if m in have]

    @property
    def kinds(self) -> list[str]:
        have = {k for _, k in self.lods}
        return [k for k in KINDS if k in have]

    @property
    def steps(self) -> np.ndarray:
        return self.trace.steps

    def row_kinds(self) -> set[str]:
        """Every row kind in the file (tensor, scalar, per-unit, spectral, ...)."""
        if "row_kinds" not in self._cache:
            t = self.trace.table
            col = t.column("kind")
            self._cache["row_kinds"] = (
                set(col.cast("string").unique().to_pylist()) if t.num_rows else set()
            )
        kinds: set[str] = self._cache["row_kinds"]
        return kinds

    def has_unit_rows(self) -> bool:
        """Per-unit statistics or anomaly records: the Units tab."""
        return bool(self.row_kinds() & _UNIT_TAB_KINDS)

    def has_spectral_rows(self) -> bool:
        """Spectra, dynamics or their scalars (noise scale, Hessian): the Spectra tab."""
        kinds = self.row_kinds()
        if kinds & _SPECTRAL_TAB_KINDS:
            return True
        if K.SCALAR_KIND not in kinds:
            return False
        return any(n.startswith(K.SPECTRAL_SCALAR_PREFIXES) for n in set(self.scalars()["name"]))

    def is_distributed(self) -> bool:
        """Rows of more than one rank, or a world size above 1: the Ranks tab."""
        if int(self.trace.metadata.get("world_size") or 1) > 1:
            return True
        t = self.trace.table
        return bool(t.num_rows) and len(t.column("rank").unique()) > 1

    def module_types(self) -> dict[str, str]:
        return {m["name"]: m.get("type", "") for m in self.trace.module_tree}

    def lod(self, module: str, kind: str) -> SeriesLOD | None:
        return self.lods.get((module, kind))

    def ymap(self, kind: str, scale: str = "symlog") -> YMap:
        if scale == "linear":
            return YMap("linear", 1.0)
        key = ("linthresh", kind)
        if key not in self._cache:
            floor = math.ldexp(1.0, self.trace.layout.emin)
            mids = [
                0.5 * (v.edges[:-1] + v.edges[1:]) for (_, k), v in self.lods.items() if k == kind
            ]
            weights = [v.col_totals for (_, k), v in self.lods.items() if k == kind]
            self._cache[key] = (
                choose_linthresh(np.concatenate(mids), np.concatenate(weights), floor)
                if mids
                else 1.0
            )
        return YMap("symlog", self._cache[key])

    def value_range(self, kind: str, module: str | None = None) -> tuple[float, float]:
        """(lo, hi) of the values (quantiles 1e-4 and 1 - 1e-4 of every step together)."""
        lods = [v for (m, k), v in self.lods.items() if k == kind and module in (None, m)]
        lo, hi = math.inf, -math.inf
        for lod in lods:
            t = lod.col_totals
            nz = np.flatnonzero(t > 0)
            if nz.size == 0:
                continue
            cum = np.cumsum(t)
            a = int(np.searchsorted(cum, 1e-4 * cum[-1]))
            b = int(np.searchsorted(cum, (1 - 1e-4) * cum[-1]))
            lo = min(lo, float(lod.edges[max(a, nz[0])]))
            hi = max(hi, float(lod.edges[min(b, nz[-1]) + 1]))
        if not math.isfinite(lo):
            return -1.0, 1.0
        return lo, hi

    # ---- per-step statistics -----------------------------------------------------------
    def stats(self) -> pd.DataFrame:
        """One row per (module, kind, step) of train rows, tensors merged: counts, mean, std,
        rms, l2, absmax, min, max, zero_frac, nan_count, inf_count."""
        if "stats" not in self._cache:
            # the model's tensors only: a derived row (a spectrum's NaN power-law fit, a
            # per-unit statistic) never raises a model flag (dnntrace.storage.kinds)
            # columns first: filtering the whole table would copy every histogram
            t = tensor_rows(self.trace.table.select(_COLUMNS))
            df = t.to_pandas()
            for c in ("module", "kind", "phase"):
                df[c] = df[c].astype(str)
            df = df[df["phase"] != "eval"]
            df["inf_count"] = df["posinf_count"] + df["neginf_count"]
            g = df.groupby(["module", "kind", "step"], sort=True, observed=True)
            out = g.agg(
                count=("count", "sum"),
                nan_count=("nan_count", "sum"),
                inf_count=("inf_count", "sum"),
                zero_count=("zero_count", "sum"),
                sum=("sum", "sum"),
                sumsq=("sumsq", "sum"),
                min=("min", "min"),
                max=("max", "max"),
                absmax=("absmax", "max"),
            ).reset_index()
            fin = out["count"] - out["nan_count"] - out["inf_count"]  # ±Inf counted together
            fin = fin.astype(float)
            out["mean"] = SK.mean(out["sum"], fin)  # header statistics: dnntrace.sketch.merge
            out["rms"] = SK.rms(out["sumsq"], fin)
            out["std"] = np.sqrt(SK.variance(out["sum"], out["sumsq"], fin))
            out["l2"] = SK.l2(out["sumsq"])
            out["zero_frac"] = SK.mean(out["zero_count"], fin)
            self._cache["stats"] = out
        return self._cache["stats"]

    def scalars(self) -> pd.DataFrame:
        """Scalar rows (loss, lr, ...): columns step, name, value."""
        if "scalars" not in self._cache:
            t = self.trace.select(kind=K.SCALAR).select(["step", "tensor", "sum"])
            df = t.to_pandas()
            df = df.rename(columns={"tensor": "name", "sum": "value"})
            df["name"] = df["name"].astype(str)
            self._cache["scalars"] = df
        return self._cache["scalars"]

    def heatmap(self, stat: str, kind: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(modules in depth order, steps, values[modules, steps]) of a statistic."""
        if stat not in STATS:
            raise ValueError(f"unknown statistic {stat!r}; one of {', '.join(STATS)}")
        df = self.stats()
        df = df[df["kind"] == kind]
        mods = [m for m in self.modules if m in set(df["module"])]
        steps = np.asarray(self.steps)
        z = np.full((len(mods), steps.size), np.nan)
        pos = {m: i for i, m in enumerate(mods)}
        si = np.searchsorted(steps, df["step"].to_numpy())
        mi = df["module"].map(pos).to_numpy()
        z[mi, si] = df[stat].to_numpy(dtype=float)
        return mods, steps, z

    def quantile_bands(self, module: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values[steps, len(QUANTILES)]) from the histograms."""
        key = ("q", module, kind)
        if key not in self._cache:
            lod = self.lods[(module, kind)]
            self._cache[key] = (lod.steps, lod.quantiles(np.array(QUANTILES)))
        return self._cache[key]

    def distribution(
        self,
        module: str,
        kind: str,
        step: int,
        ymap: YMap,
        y_range: tuple[float, float],
        bins: int = 240,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(display-coordinate bin centres, fraction of the step's values per bin) at the
        recorded step closest to ``step`` (fractions of 0 when the module has no such row)."""
        lod = self.lods.get((module, kind))
        yq = np.linspace(y_range[0], y_range[1], bins + 1)
        centres = 0.5 * (yq[:-1] + yq[1:])
        if lod is None or lod.steps.size == 0:
            return centres, np.zeros(bins)
        i = int(np.clip(np.searchsorted(lod.steps, step), 0, lod.steps.size - 1))
        cdf = lod.step_cdf(i)
        total = cdf[-1]
        g = np.interp(yq, ymap.fwd(lod.edges), cdf)
        frac = np.diff(g) / total if total > 0 else np.zeros(bins)
        return centres, frac

    # ---- health --------------------------------------------------------------------------
    def health(self) -> pd.DataFrame:
        """One row per module of the tree (forward order): flags and the numbers behind them."""
        if "health" in self._cache:
            return self._cache["health"]
        df = self.stats()
        types = self.module_types()
        rows = []
        last = df.sort_values("step").groupby(["module", "kind"], observed=True).tail(1)
        last = last.set_index(["module", "kind"])
        bad = df[(df["nan_count"] + df["inf_count"]) > 0]
        first_bad = bad.groupby("module")["step"].min().to_dict() if len(bad) else {}
        grad_ratio = self._grad_ratios()
        frozen = self._frozen()
        by_name = {m["name"]: m for m in self.trace.module_tree}
        tree = [by_name[n] for n in self.trace.execution_order if n in by_name]  # run order
        for m in tree or [{"name": n, "type": "", "depth": 1} for n in self.modules]:
            name = m["name"]
            flags: list[str] = []
            zf = sat = math.nan
            if name in first_bad:
                flags.append("nan")
            if (name, K.ACTIVATION) in last.index:
                zf = float(last.loc[(name, K.ACTIVATION), "zero_frac"])
                if zf >= DEAD_ZERO_FRACTION:
                    flags.append("dead")
                sat = self._saturation(name, types.get(name, ""))
                if sat >= SATURATED_FRACTION:
                    flags.append("saturated")
            gr = grad_ratio.get(name, math.nan)
            if gr < 1 / GRAD_RATIO:
                flags.append("vanishing")
            elif gr > GRAD_RATIO:
                flags.append("exploding")
            if frozen.get(name):
                flags.append("frozen")
            rows.append(
                {
                    "module": name or "<root>",
                    "path": name,
                    "type": m.get("type", ""),
                    "depth": int(m.get("depth", 0)),
                    "flags": " ".join(flags),
                    "first_nan_step": first_bad.get(name, None),
                    "zero_frac": zf,
                    "saturation": sat,
                    "grad_ratio": gr,
                }
            )
        out = pd.DataFrame(rows)
        out["first_nan_step"] = out["first_nan_step"].astype("Int64")
        self._cache["health"] = out
        return out

    def first_nonfinite(self) -> dict[str, Any] | None:
        """The earliest NaN/Inf: {step, module, kind, nan_count, inf_count}, module in forward
        order at that step; None for a clean run."""
        if "first_nonfinite" not in self._cache:  # a scan of the table: once per opened run
            an = [a for a in _without_histograms(self.trace).anomalies() if a["kind"] != K.SCALAR]
            self._cache["first_nonfinite"] = min(an, key=lambda a: a["step"]) if an else None
        first: dict[str, Any] | None = self._cache["first_nonfinite"]
        return first

    def _saturation(self, module: str, mtype: str) -> float:
        lod = self.lods.get((module, K.ACTIVATION))
        if lod is None or lod.steps.size == 0 or not (mtype in TANH_LIKE or mtype in SIGMOID_LIKE):
            return math.nan
        cdf = lod.step_cdf(lod.steps.size - 1)
        total = cdf[-1]
        if total <= 0:
            return math.nan
        hi_bound = 1.0 - SATURATION_MARGIN
        lo_bound = -hi_bound if mtype in TANH_LIKE else SATURATION_MARGIN
        below = np.interp(lo_bound, lod.edges, cdf)
        above = total - np.interp(hi_bound, lod.edges, cdf)
        return float((below + above) / total)

    def _grad_ratios(self) -> dict[str, float]:
        df = self.stats()
        for kind in (K.ACTIVATION_GRAD, K.WEIGHT_GRAD):
            g = df[df["kind"] == kind]
            if len(g):
                break
        else:
            return {}
        mods = [m for m in self.modules if m in set(g["module"])]
        if not mods:
            return {}
        piv = g.pivot_table(index="step", columns="module", values="rms", observed=True)
        piv = piv[mods]
        tail = piv.iloc[-max(1, len(piv) // 10) :]
        ref = tail[mods[-1]]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = tail.div(ref.where(ref > 0), axis=0)
        med = ratio.median(axis=0, skipna=True)
        return {m: float(med[m]) for m in mods}

    def _frozen(self) -> dict[str, bool]:
        t = self.trace.select(kind=K.WEIGHT).select(["module", "tensor", "step", "sum", "sumsq"])
        if t.num_rows == 0:
            return {}
        df = t.to_pandas()
        df["module"] = df["module"].astype(str)
        df["tensor"] = df["tensor"].astype(str)
        out: dict[str, bool] = {}
        for (mod, _), g in df.groupby(["module", "tensor"], observed=True):
            if g["step"].nunique() < 2:
                still = False
            else:
                s, q = g["sum"].to_numpy(), g["sumsq"].to_numpy()
                s, q = np.nan_to_num(s), np.nan_to_num(q)
                scale = abs(s[0]) + math.sqrt(abs(q[0])) + 1e-300
                still = bool(
                    np.max(np.abs(s - s[0])) <= FROZEN_RTOL * scale
                    and np.max(np.abs(q - q[0])) <= FROZEN_RTOL * (abs(q[0]) + 1e-300)
                )
            out[mod] = out.get(mod, True) and still
        return out


class RunStore(pn.viewable.Viewer):
    """The runs being viewed and what is selected in them."""

    paths = param.List(default=[], item_type=str, doc="trace files")
    run = param.Selector(default=None, objects=[], doc="run shown")
    compare = param.Selector(default=None, objects=[None], doc="second run to compare")
    module = param.Selector(default=None, objects=[], doc="module in detail")
    kind = param.Selector(default=K.ACTIVATION, objects=list(KINDS))
    step = param.Integer(default=0, doc="step of the distribution view")
    compare_step = param.Integer(default=None, allow_None=True, doc="a second step to overlay")
    overlay = param.ListSelector(default=[], objects=[], doc="modules overlaid at a step")
    steps = param.Range(default=(0, 0), doc="step window")
    yscale = param.Selector(default="symlog", objects=["symlog", "linear"])
    stat = param.Selector(default="rms", objects=list(STATS))
    follow = param.Boolean(default=False, doc="re-read the files while a run writes them")
    version = param.Integer(default=0, doc="bumped whenever the data changes")

    def __init__(self, runs: Sequence[Run] | None = None, **params: Any) -> None:
        super().__init__(**params)
        self.runs: dict[str, Run] = {}
        if runs is None:
            runs = [Run.open(p) for p in self.paths]
        for r in runs:
            name = r.name
            i = 2
            while name in self.runs:
                name, i = f"{r.name} ({i})", i + 1
            self.runs[name] = r
        self._signatures = {n: r.signature() for n, r in self.runs.items()}
        names = list(self.runs)
        self.param.run.objects = names
        self.param.compare.objects = [None, *names]
        self.run = names[0] if names else None
        self._sync_run()

    @property
    def current(self) -> Run:
        return self.runs[self.run]

    @param.depends("run", watch=True)
    def _sync_run(self) -> None:
        if self.run is None:
            return
        r = self.current
        mods = r.modules
        kinds = r.kinds or list(KINDS)
        self.param.kind.objects = kinds
        self.param.module.objects = mods
        self.param.overlay.objects = mods
        steps = r.steps
        lo, hi = (int(steps[0]), int(steps[-1])) if steps.size else (0, 0)
        with param.parameterized.discard_events(self):
            if self.kind not in kinds:
                self.kind = kinds[0]
            if self.module not in mods:
                self.module = self._default_module(r, self.kind)
            self.overlay = [m for m in self.overlay if m in mods] or mods[-3:]
            self.steps = (lo, hi)
            self.step = lo if self.step < lo or self.step > hi else self.step
        self.version += 1

    @staticmethod
    def _default_module(r: Run, kind: str | None = None) -> str | None:
        """The module of the first NaN/Inf, else the first with histograms of ``kind``."""
        bad = r.first_nonfinite()
        if bad is not None and bad["module"] in r.modules:
            return bad["module"]
        with_rows = [m for m in r.modules if kind is None or r.lod(m, kind) is not None]
        return (with_rows or r.modules or [None])[0]

    def clone(self) -> RunStore:
        """A store over the same opened runs with the same selection (one per browser
        session, so sessions do not steer each other)."""
        other = RunStore(runs=list(self.runs.values()), paths=list(self.paths))
        other.param.update(
            **{
                k: getattr(self, k)
                for k in ("run", "kind", "module", "yscale", "stat", "follow", "overlay")
            }
        )
        return other

    def step_values(self) -> np.ndarray:
        return np.asarray(self.current.steps)

    def poll(self) -> bool:
        """Re-read runs whose file changed (live follow); True if anything changed."""
        changed = False
        for name, r in list(self.runs.items()):
            try:
                sig = r.signature()
            except OSError:
                continue
            if sig == self._signatures.get(name):
                continue
            try:
                self.runs[name] = r.reopen()
            except TraceError:
                continue  # mid-write: try again next tick
            self._signatures[name] = sig
            changed = True
        if changed:
            self._sync_run()
        return changed

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Param(self, parameters=["run", "compare", "kind", "module", "yscale", "stat"])
