"""Synthetic traces that look like a real training run: test fixtures, also used by
bench/bench_viewer.py and bench/bench_viewer_units.py (which put this folder on ``sys.path``).

A tanh MLP of ``layers`` blocks (``fc<i>`` Linear, ``act<i>`` Tanh): pre-activations widen over the
run so deeper layers saturate (Glorot & Bengio 2010), gradients shrink with depth towards the input
and more so as training goes on, one block can use a ReLU that dies, one Linear can be frozen, and
one layer's gradients turn NaN from a chosen step on. Histograms are drawn from the exact bucket
probabilities of each distribution (stochastic rounding of ``n * p``), so a trace of 10**9 points
costs seconds, not the time to sample 10**9 values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from scipy.special import ndtr

from dnntrace.storage import Layout, TraceWriter, scalar_batch, state_to_batch
from dnntrace.storage import layout as L

ALL_KINDS = ("activation", "activation_grad", "weight", "weight_grad")


@dataclass
class SyntheticSpec:
    steps: int = 200
    layers: int = 6
    width: int = 64
    batch: int = 32
    kinds: Sequence[str] = ALL_KINDS
    nan_step: int | None = 150
    nan_layer: int = 3
    dead_layer: int | None = 4
    frozen_layer: int | None = 0
    every: int = 1
    seed: int = 0
    layout: Layout = field(default_factory=Layout)
    steps_per_batch: int = 25

    @property
    def step_values(self) -> np.ndarray:
        return np.arange(0, self.steps * self.every, self.every, dtype=np.int64)


def _module_tree(spec: SyntheticSpec) -> list[dict]:
    tree: list[dict] = [{"name": "", "type": "MLP", "depth": 0, "params": {}}]
    for i in range(spec.layers):
        w = spec.width
        tree.append(
            {
                "name": f"fc{i}",
                "type": "Linear",
                "depth": 1,
                "params": {"weight": [w, w], "bias": [w]},
            }
        )
        act = "ReLU" if i == spec.dead_layer else "Tanh"
        tree.append({"name": f"act{i}", "type": act, "depth": 1, "params": {}})
    return tree


def _counts_rows(
    cdf: np.ndarray,
    n: np.ndarray,
    lay: Layout,
    rng: np.random.Generator,
    nan: np.ndarray,
    exact_zero: np.ndarray,
) -> np.ndarray:
    """Counts rows from CDFs evaluated at the layout's signed edges (rows x (bins + 1)).

    ``exact_zero`` is the probability mass sitting exactly at 0 (a ReLU's zeros)."""
    rows = cdf.shape[0]
    p = lay.per_sign
    out = np.zeros((rows, lay.width), np.int64)
    probs = np.diff(cdf, axis=1)
    # the gap [-2**emin, 2**emin] between the windows: underflow (exact zeros kept apart)
    gap = np.clip(cdf[:, p + 1] - cdf[:, p] - exact_zero, 0, None)
    below = cdf[:, 0]
    above = 1.0 - cdf[:, -1]
    probs = np.concatenate([probs[:, :p], probs[:, p + 1 :]], axis=1)  # drop the gap column
    finite_n = (n - nan).astype(np.float64)[:, None]
    hist = np.floor(probs * finite_n + rng.random(probs.shape)).astype(np.int64)
    # stochastic rounding drifts the total: settle the difference on each row's fullest bucket
    top = hist.argmax(axis=1)
    rows_i = np.arange(rows)
    zeros = np.floor(exact_zero * finite_n[:, 0] + rng.random(rows)).astype(np.int64)
    under = np.floor(gap * finite_n[:, 0] + rng.random(rows)).astype(np.int64)
    over_neg = np.floor(below * finite_n[:, 0] + rng.random(rows)).astype(np.int64)
    over_pos = np.floor(above * finite_n[:, 0] + rng.random(rows)).astype(np.int64)
    drift = (n - nan) - (hist.sum(axis=1) + zeros + under + over_neg + over_pos)
    has_hist = hist.sum(axis=1) > 0
    hist[rows_i, top] = np.where(
        has_hist, np.maximum(hist[rows_i, top] + drift, 0), hist[rows_i, top]
    )
    zeros = np.where(has_hist, zeros, np.maximum(zeros + drift, 0))
    out[:, L.HEADER :] = hist
    out[:, L.ZEROS] = zeros
    out[:, L.UNDER_POS] = under // 2
    out[:, L.UNDER_NEG] = under - under // 2
    out[:, L.OVER_NEG] = over_neg
    out[:, L.OVER_POS] = over_pos
    out[:, L.NAN] = nan
    out[:, L.COUNT] = hist.sum(axis=1) + zeros + under + over_neg + over_pos + nan
    out[:, L.NEGATIVES] = hist[:, :p].sum(axis=1) + out[:, L.UNDER_NEG] + over_neg
    out[:, L.CALLS] = 1
    return out


def _moments(counts: np.ndarray, lay: Layout) -> np.ndarray:
    """Moments consistent with the histogram (bucket representatives)."""
    rep = lay.representatives()
    h = counts[:, L.HEADER :].astype(np.float64)
    m = np.zeros((counts.shape[0], L.NUM_MOMENTS))
    m[:, L.SUM] = h @ rep
    m[:, L.SUMSQ] = h @ (rep * rep)
    nz = h > 0
    lo = np.where(nz, rep[None, :], np.inf).min(axis=1)
    hi = np.where(nz, rep[None, :], -np.inf).max(axis=1)
    has_zero = counts[:, L.ZEROS] + counts[:, L.UNDER_POS] + counts[:, L.UNDER_NEG] > 0
    m[:, L.MIN] = np.where(has_zero, np.minimum(lo, 0.0), lo)
    m[:, L.MAX] = np.where(has_zero, np.maximum(hi, 0.0), hi)
    return m


def write_synthetic(
    path: str | os.PathLike[str],
    spec: SyntheticSpec | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write a synthetic trace to ``path``; returns {"rows", "bytes", "points"}."""
    spec = spec or SyntheticSpec()
    lay = spec.layout
    rng = np.random.default_rng(spec.seed)
    # lay.edges() has bins + 2 values: the negative window, the gap [-2**emin, 2**emin] and the
    # positive window, so np.diff gives p negative buckets, the gap, p positive buckets
    e = lay.edges()
    e_clip = np.clip(e, -1 + 1e-15, 1 - 1e-15)
    atanh_e = np.arctanh(e_clip)
    meta = {
        "dnntrace_version": "synthetic",
        "layout": lay.to_dict(),
        "options": {"every": spec.every, "synthetic": True},
        "modules": _module_tree(spec),
    }
    w, b = spec.width, spec.batch
    # rows of one step: (module, kind, tensor, numel, shape, family, layer, scale-role)
    slots: list[tuple[str, str, str, tuple[int, ...], str, int]] = []
    for i in range(spec.layers):
        fc, act = f"fc{i}", f"act{i}"
        if "activation" in spec.kinds:
            slots.append((fc, "activation", "", (b, w), "pre", i))
            slots.append(
                (act, "activation", "", (b, w), "relu" if i == spec.dead_layer else "tanh", i)
            )
        if "activation_grad" in spec.kinds:
            slots.append((fc, "activation_grad", "", (b, w), "grad", i))
            slots.append((act, "activation_grad", "", (b, w), "grad", i))
        if "weight" in spec.kinds:
            slots.append((fc, "weight", "weight", (w, w), "weight", i))
            slots.append((fc, "weight", "bias", (w,), "bias", i))
        if "weight_grad" in spec.kinds and i != spec.frozen_layer:
            slots.append((fc, "weight_grad", "weight", (w, w), "wgrad", i))
            slots.append((fc, "weight_grad", "bias", (w,), "wgrad", i))
    steps = spec.step_values
    total = len(steps)
    nl = max(spec.layers - 1, 1)
    writer = TraceWriter(path, meta)
    points = 0
    try:
        for start in range(0, total, spec.steps_per_batch):
            chunk = steps[start : start + spec.steps_per_batch]
            t = (np.arange(start, start + len(chunk)) / max(total - 1, 1))[:, None]  # (S,1)
            sl = np.array([s[5] for s in slots])[None, :]  # (1,R)
            fam = [s[4] for s in slots]
            depth = (sl + 1) / spec.layers
            pre_s = 0.5 + 3.0 * depth * t  # pre-activation std: deeper layers saturate
            g_factor = 0.5 * (0.05 / 0.5) ** t  # per-layer gradient shrink, 0.5 -> 0.05
            grad_s = 0.1 * g_factor ** (nl - sl)
            w_s = 0.08 * (1 + 0.5 * t * (sl != spec.frozen_layer))
            cdfs = np.empty((len(chunk), len(slots), e.size))
            exact0 = np.zeros((len(chunk), len(slots)))
            for r, f in enumerate(fam):
                if f == "pre":
                    cdfs[:, r] = ndtr(e[None, :] / pre_s[:, r : r + 1])
                elif f == "tanh":
                    cdfs[:, r] = ndtr(atanh_e[None, :] / pre_s[:, r : r + 1])
                elif f == "relu":
                    mu = 0.3 - 2.5 * t[:, 0]  # the bias drifts negative: the ReLU dies
                    sd = np.maximum(1.0 - 0.9 * t[:, 0], 0.05)
                    z = ndtr((0 - mu) / sd)
                    cdfs[:, r] = np.where(
                        e[None, :] < 0, 0.0, ndtr((e[None, :] - mu[:, None]) / sd[:, None])
                    )
                    exact0[:, r] = z
                elif f in ("grad", "wgrad"):
                    cdfs[:, r] = ndtr(e[None, :] / grad_s[:, r : r + 1])
                elif f == "weight":
                    cdfs[:, r] = ndtr(e[None, :] / w_s[:, r : r + 1])
                else:  # bias: small positive offset
                    cdfs[:, r] = ndtr((e[None, :] - 0.01) / (0.5 * w_s[:, r : r + 1]))
            frozen = [
                r for r, s in enumerate(slots) if s[5] == spec.frozen_layer and s[1] == "weight"
            ]
            n = np.array([int(np.prod(s[3])) for s in slots], np.int64)
            nan = np.zeros((len(chunk), len(slots)), np.int64)
            if spec.nan_step is not None:
                bad = [
                    r
                    for r, s in enumerate(slots)
                    if s[5] == spec.nan_layer and s[1] in ("activation_grad", "weight_grad")
                ]
                after = chunk >= spec.nan_step * spec.every
                for r in bad:
                    nan[after, r] = np.maximum(n[r] // 100, 1)
            flat_cdf = cdfs.reshape(-1, e.size)
            flat_n = np.broadcast_to(n, (len(chunk), len(slots))).reshape(-1)
            counts = _counts_rows(flat_cdf, flat_n, lay, rng, nan.reshape(-1), exact0.reshape(-1))
            counts = counts.reshape(len(chunk), len(slots), lay.width)
            if frozen:
                if start == 0:
                    frozen_counts = counts[0, frozen].copy()
                counts[:, frozen] = frozen_counts[None]
            counts = counts.reshape(-1, lay.width)
            moments = _moments(counts, lay)
            points += int(counts[:, L.COUNT].sum())
            ns = len(slots)
            batch = state_to_batch(
                counts,
                moments,
                lay,
                step=np.repeat(chunk, ns),
                module=[s[0] for s in slots] * len(chunk),
                kind=[s[1] for s in slots] * len(chunk),
                tensor=[s[2] for s in slots] * len(chunk),
                dtype=["float32"] * (ns * len(chunk)),
                shape=[s[3] for s in slots] * len(chunk),
                wall_time_s=1.7e9 + np.repeat(chunk, ns) * 0.05,
            )
            writer.write(batch)
            scalars = []
            for j, s in enumerate(chunk):
                k = start + j
                loss = 2.3 * math.exp(-3 * k / max(total, 1)) + 0.05 * rng.random()
                if spec.nan_step is not None and s >= spec.nan_step * spec.every:
                    loss = math.nan
                scalars.append(scalar_batch(int(s), ["loss", "lr"], [loss, 1e-3], layout=lay))
            # one batch for the chunk's scalars, as a tracer buffering rows writes them
            # (every Arrow batch costs ~0.8 ms to read back, whatever its size)
            merged = pa.Table.from_batches(scalars).combine_chunks().unify_dictionaries()
            writer.write(merged.to_batches(max_chunksize=len(merged))[0])
            if progress is not None:
                progress(min(start + len(chunk), total), total)
    finally:
        rows, nbytes = writer.close()
    return {"rows": rows, "bytes": nbytes, "points": points}


# ---- per-unit rows ----------------------------------------------------------------------------
@dataclass
class UnitsSpec:
    """One ReLU layer (module ``hidden_act``) of ``units`` units traced for ``steps`` steps:
    ``unit_mean`` and ``unit_firing`` rows, one per kind and step. Dead units (firing and mean
    exactly 0) come in three patterns so the dead map has structure at every zoom: a band dead
    from the start that revives half-way, a block dying unit by unit along a diagonal, and a
    scatter of units dying at random steps."""

    units: int = 100_000
    steps: int = 10_000
    kinds: Sequence[str] = ("unit_mean", "unit_firing")
    scatter_dead: float = 0.03
    seed: int = 0
    cells_per_batch: int = 1 << 21
    compression: str | None = None  # uncompressed: the viewer memory-maps it without copies

    @property
    def cells(self) -> int:
        return self.units * self.steps


def units_spec(cells: float, **kw: object) -> UnitsSpec:
    """A spec of about ``cells`` units × steps cells, ten units per step (10**9: 10**5 × 10**4)."""
    units = max(1, round(math.sqrt(10 * cells)))
    return UnitsSpec(units=units, steps=max(1, round(cells / units)), **kw)  # type: ignore[arg-type]


def _death_steps(spec: UnitsSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the first dead step index and the first step alive again (``steps``: never)."""
    u, s = spec.units, spec.steps
    die = np.full(u, s, np.int64)
    revive = np.full(u, s, np.int64)
    band = slice(int(0.30 * u), max(int(0.32 * u), int(0.30 * u) + 1))
    die[band] = 0
    revive[band] = s // 2
    lo, hi = int(0.60 * u), max(int(0.75 * u), int(0.60 * u) + 1)
    die[lo:hi] = np.linspace(0.2 * s, 0.9 * s, hi - lo).astype(np.int64)
    pick = rng.random(u) < spec.scatter_dead
    die[pick] = np.minimum(die[pick], rng.integers(0, s, int(pick.sum())))
    return die, revive


def write_synthetic_units(
    path: str | os.PathLike[str],
    spec: UnitsSpec | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write a per-unit trace through the trace writer; returns {"rows", "bytes", "cells"}."""
    from dnntrace.storage.rows import hist_with_empty, vector_state

    spec = spec or UnitsSpec()
    lay = Layout()
    rng = np.random.default_rng(spec.seed)
    u, total = spec.units, spec.steps
    meta = {
        "dnntrace_version": "synthetic",
        "layout": lay.to_dict(),
        "options": {"every": 1, "synthetic": True, "units": True},
        "modules": [
            {"name": "", "type": "MLP", "depth": 0, "params": {}},
            {"name": "hidden", "type": "Linear", "depth": 1, "params": {"weight": [u, 256]}},
            {"name": "hidden_act", "type": "ReLU", "depth": 1, "params": {}},
        ],
    }
    # per unit: a pre-activation offset, a drift over the run, a slow oscillation
    base = rng.normal(0.3, 0.6, u).astype(np.float32)
    drift = rng.normal(0.0, 0.8, u).astype(np.float32)
    freq = rng.uniform(0.5, 4.0, u).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, u).astype(np.float32)
    die, revive = _death_steps(spec, rng)
    per = max(1, spec.cells_per_batch // max(u, 1))
    empty = (pa.array([], pa.list_(pa.uint16())), pa.array([], pa.list_(pa.uint32())))
    writer = TraceWriter(path, meta, compression=spec.compression)
    try:
        for start in range(0, total, per):
            idx = np.arange(start, min(start + per, total))
            t = (idx / max(total - 1, 1)).astype(np.float32)[:, None]
            pre = base + drift * (1 - np.exp(-t / 0.3)) + 0.3 * np.sin(freq * t * 6.283 + phase)
            pre += 0.1 * rng.standard_normal(pre.shape, dtype=np.float32)
            firing = 1 / (1 + np.exp(-3 * pre))  # fraction of a unit's outputs above 0
            mean = np.log1p(np.exp(pre)) * 0.5  # softplus: a ReLU's mean output
            dead = (idx[:, None] >= die) & (idx[:, None] < revive)
            firing[dead] = 0
            mean[dead] = 0
            by_kind = {"unit_firing": firing, "unit_mean": mean}
            vecs = [by_kind[k][j] for j in range(len(idx)) for k in spec.kinds]
            counts, moments = vector_state(vecs, lay, width=L.HEADER)
            n = len(vecs)
            batch = state_to_batch(
                counts,
                moments,
                lay,
                step=np.repeat(idx, len(spec.kinds)),
                module=["hidden_act"] * n,
                kind=list(spec.kinds) * len(idx),
                tensor=[""] * n,
                dtype=["float32"] * n,
                shape=[(u,)] * n,
                wall_time_s=1.7e9 + np.repeat(idx, len(spec.kinds)) * 0.05,
                values=vecs,
                hist=hist_with_empty(*empty, n),
            )
            writer.write(batch)
            if progress is not None:
                progress(int(idx[-1]) + 1, total)
    finally:
        rows, nbytes = writer.close()
    return {"rows": rows, "bytes": nbytes, "cells": spec.cells}


def write_synthetic_ranks(
    folder: str | os.PathLike[str],
    *,
    ranks: int = 4,
    steps: int = 30,
    modules: Sequence[str] = ("fc1", "fc2", "fc3"),
    nan: tuple[int, int, str] | None = (2, 20, "fc2"),
    straggler: int | None = 1,
    divergent: int | None = 3,
    seed: int = 0,
) -> str:
    """Rank files of a made-up run (no torch): ``nan = (rank, step, module)`` where a NaN first
    appears (the other ranks follow one step later), ``straggler`` a rank 50 ms late each step,
    ``divergent`` a rank whose activations are twice as large. Returns the folder."""
    rng = np.random.default_rng(seed)
    lay = Layout()
    os.makedirs(folder, exist_ok=True)
    mods = [{"name": "", "type": "Net", "depth": 0, "params": {}}] + [
        {"name": m, "type": "Linear", "depth": 1, "params": {"weight": [8, 8]}} for m in modules
    ]
    t0 = 1.7e9
    for r in range(ranks):
        meta = {"rank": r, "world_size": ranks, "layout": lay.to_dict(), "modules": mods}
        with TraceWriter(os.path.join(os.fspath(folder), f"rank{r}.arrow"), meta) as w:
            for s in range(steps):
                n = len(modules)
                counts = np.zeros((2 * n, lay.width), np.int64)
                moments = np.zeros((2 * n, 8))
                for i, m in enumerate(modules):
                    for j, kind in enumerate(("activation", "weight_grad")):
                        scale = (2.0 if r == divergent and kind == "activation" else 1.0) * (i + 1)
                        v = rng.normal(0, scale, 64).astype(np.float32)
                        if nan is not None and m == nan[2] and s >= nan[1] + (r != nan[0]):
                            v[:3] = np.nan
                        row = 2 * i + j
                        fin = v[np.isfinite(v)]
                        counts[row, 0] = v.size
                        counts[row, 1] = np.isnan(v).sum()
                        counts[row, 10] = 1
                        moments[row, 0] = fin.sum()
                        moments[row, 2] = (fin.astype(np.float64) ** 2).sum()
                        moments[row, 4] = fin.min()
                        moments[row, 5] = fin.max()
                labels = [(m, k) for m in modules for k in ("activation", "weight_grad")]
                wall = t0 + s + (0.05 if r == straggler else 0.0) + rng.uniform(0, 0.002)
                w.write(
                    state_to_batch(
                        counts,
                        moments,
                        lay,
                        step=s,
                        module=[lb[0] for lb in labels],
                        kind=[lb[1] for lb in labels],
                        tensor=["" if lb[1] == "activation" else "weight" for lb in labels],
                        dtype=["float32"] * len(labels),
                        shape=[(64,)] * len(labels),
                        rank=r,
                        wall_time_s=wall,
                    )
                )
    return os.fspath(folder)


def main(argv: Sequence[str] | None = None) -> None:
    """``python tests/viewer/_synthetic.py OUT.arrow [--units-cells 1e9]``."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument(
        "--units-cells",
        type=float,
        default=None,
        help="write a per-unit trace of about this many units x steps cells instead",
    )
    args = ap.parse_args(argv)
    if args.units_cells:
        info = write_synthetic_units(args.out, units_spec(args.units_cells))
    else:
        info = write_synthetic(args.out)
    print(info)  # noqa: T201


if __name__ == "__main__":
    main()
