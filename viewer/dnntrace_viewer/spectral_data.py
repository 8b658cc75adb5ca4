"""Frames for the spectral views, read from a trace through ``dnntrace.storage`` (no torch).

Row kinds are those of ``dnntrace.capture.spectral`` (docs/FORMAT.md, "Vector rows"). A layer is
named ``module.tensor`` (``module`` alone for activation kinds, whose tensor is ``""``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa

from dnntrace.storage import Trace, load
from dnntrace.storage import kinds as K
from dnntrace.storage.files import landscape_path

LAYER_KINDS = (K.SIGMA_MAX, K.STABLE_RANK, K.FROBENIUS_NORM, K.UPDATE_RATIO)


def _layer(module: str, tensor: str) -> str:
    if not tensor:
        return module or "(model)"
    return f"{module}.{tensor}" if module else tensor


@dataclass
class Spectrum:
    source_step: int  # the step whose weights these are
    layer: str
    singular_values: np.ndarray  # descending
    alpha: float
    ks_distance: float
    xmin: float
    n_tail: int


@dataclass
class Grid:
    xs: np.ndarray
    ys: np.ndarray
    loss: np.ndarray  # [len(ys), len(xs)]
    info: dict


class SpectralData:
    """Everything the spectral views show, from one run trace and optionally its landscape."""

    def __init__(
        self, path: str | os.PathLike[str], landscape: str | os.PathLike[str] | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.trace: Trace = load(self.path)
        self.landscape_path = os.fspath(landscape) if landscape is not None else None

    def _rows(self, kind: str) -> pa.Table:
        return self.trace.select(kind=kind)

    @staticmethod
    def _cols(t: pa.Table) -> tuple[np.ndarray, list[str], list[str], list]:
        return (
            t.column("step").to_numpy(),
            t.column("module").cast(pa.string()).to_pylist(),
            t.column("tensor").cast(pa.string()).to_pylist(),
            t.column("values").to_pylist(),
        )

    def has(self, kind: str) -> bool:
        return kind in self.trace.kinds

    def layer_series(self, kind: str) -> pd.DataFrame:
        """``step, layer, value`` for a per-layer scalar kind (length-1 vector rows)."""
        t = self._rows(kind)
        if t.num_rows == 0:
            return pd.DataFrame({"step": [], "layer": [], "value": []})
        steps, mods, tens, vals = self._cols(t)
        return pd.DataFrame(
            {
                "step": steps,
                "layer": [_layer(m, x) for m, x in zip(mods, tens, strict=True)],
                "value": [v[0] if v else np.nan for v in vals],
            }
        )

    @cached_property
    def spectra(self) -> list[Spectrum]:
        """Full spectra with their power-law fits, ordered by layer then source step. The
        ``spectrum`` and ``esd`` rows of one (step, module, tensor) pair up in order."""
        sp, es = self._rows(K.SPECTRUM), self._rows(K.ESD)
        if sp.num_rows == 0 or es.num_rows == 0:
            return []
        pending: dict[tuple[int, str, str], list[np.ndarray]] = {}
        for s, m, x, v in zip(*self._cols(sp), strict=True):
            pending.setdefault((int(s), m, x), []).append(np.asarray(v, np.float64))
        out = []
        for s, m, x, v in zip(*self._cols(es), strict=True):
            lst = pending.get((int(s), m, x))
            if not lst:
                continue
            sv = lst.pop(0)
            f = K.unpack(K.ESD, v)  # by name (storage.kinds)
            out.append(Spectrum(int(f["step"]), _layer(m, x), sv, f["alpha"], f["ks_distance"],
                                f["xmin"], int(f["n_tail"])))  # fmt: skip
        return sorted(out, key=lambda z: (z.layer, z.source_step))

    def esd_table(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "step": [z.source_step for z in self.spectra],
                "layer": [z.layer for z in self.spectra],
                "alpha": [z.alpha for z in self.spectra],
                "ks_distance": [z.ks_distance for z in self.spectra],
            }
        )

    def scalars(self, names: list[str]) -> pd.DataFrame:
        """``step, name, value`` of scalar rows with these names."""
        t = self._rows(K.SCALAR)
        if t.num_rows == 0:
            return pd.DataFrame({"step": [], "name": [], "value": []})
        df = pd.DataFrame(
            {
                "step": t.column("step").to_numpy(),
                "name": t.column("tensor").cast(pa.string()).to_pylist(),
                "value": t.column("sum").to_numpy(zero_copy_only=False),
            }
        )
        return df[df["name"].isin(names)].reset_index(drop=True)

    def rankme(self) -> pd.DataFrame:
        t = self._rows(K.RANKME)
        if t.num_rows == 0:
            return pd.DataFrame({"step": [], "layer": [], "value": []})
        _, mods, tens, vals = self._cols(t)
        return pd.DataFrame(
            {
                "step": [int(K.unpack(K.RANKME, v)["step"]) for v in vals],
                "layer": [_layer(m, x) for m, x in zip(mods, tens, strict=True)],
                "value": [K.unpack(K.RANKME, v)["rankme"] for v in vals],
            }
        ).sort_values(["layer", "step"])

    def trajectory(self) -> pd.DataFrame:
        """``step, x, y`` on the first two random directions (``trajectory`` rows)."""
        t = self._rows(K.TRAJECTORY)
        if t.num_rows == 0:
            return pd.DataFrame({"step": [], "x": [], "y": []})
        steps, _, tens, vals = self._cols(t)
        want = self.grid.info.get("tensor") if self.grid is not None else None
        keep = [i for i, x in enumerate(tens) if want is None or x == want]
        return pd.DataFrame(
            {
                "step": steps[keep],
                "x": [vals[i][0] for i in keep],
                "y": [vals[i][1] for i in keep],
            }
        ).sort_values("step")

    @cached_property
    def grid(self) -> Grid | None:
        p = self.landscape_path
        if p is None:
            guess = landscape_path(self.path)
            p = guess if os.path.exists(guess) else None
        if p is None:
            return None
        lt = load(p)
        ax = lt.select(kind=K.LANDSCAPE_AXIS)
        axes = dict(
            zip(
                ax.column("tensor").cast(pa.string()).to_pylist(),
                ax.column("values").to_pylist(),
                strict=True,
            )
        )
        rows = lt.select(kind=K.LANDSCAPE)
        order = np.argsort(rows.column("step").to_numpy())
        vals = rows.column("values").to_pylist()
        loss = np.array([vals[i] for i in order], np.float64)
        return Grid(
            np.asarray(axes["x"]), np.asarray(axes["y"]), loss, lt.metadata.get("landscape", {})
        )
