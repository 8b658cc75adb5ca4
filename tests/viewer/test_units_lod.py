"""Out-of-core units × steps matrices: the streamed build, pyramid and windows against an
in-memory numpy definition; dead/saturated maps and fractions; the ``.units`` cache (reuse,
invalidation, read-only folders, a full disk); the synthetic per-unit trace and its bench."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from _synthetic import UnitsSpec, units_spec, write_synthetic_units

from dnntrace.storage import Layout, TraceWriter, load
from dnntrace.storage import layout as L
from dnntrace.storage.rows import hist_with_empty, state_to_batch, vector_state
from dnntrace_viewer import units_data as U
from dnntrace_viewer.units_data import Pyramid, UnitData

ROOT = Path(__file__).parents[2]


# ---- numpy reference: the whole matrix in memory ----------------------------------------------
def matrix_ref(rows: list[tuple[int, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values[unit, column]): one column per row in stable step order, NaN padded."""
    order = sorted(range(len(rows)), key=lambda i: rows[i][0])
    n = max((0 if v is None else len(v) for _, v in rows), default=0)
    m = np.full((n, len(rows)), np.nan, np.float32)
    for j, i in enumerate(order):
        v = rows[i][1]
        if v is not None:
            m[: len(v), j] = v
    return np.array([rows[i][0] for i in order], np.int64), m


def halve_ref(a: np.ndarray, how: str) -> np.ndarray:
    """2 × 2 blocks, NaN padded: NaN-aware mean (float64 then float32) or fmax."""
    h, w = a.shape
    p = np.full((h + h % 2, w + w % 2), np.nan, np.float64)
    p[:h, :w] = a
    b = p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2)
    if how == "max":
        return np.fmax(
            np.fmax(b[:, 0, :, 0], b[:, 0, :, 1]), np.fmax(b[:, 1, :, 0], b[:, 1, :, 1])
        ).astype(np.float32)
    fin = np.isfinite(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(fin, b, 0).sum(axis=(1, 3)) / fin.sum(axis=(1, 3))).astype(np.float32)


def levels_ref(a: np.ndarray, how: str = "mean", min_side: int = 64) -> list[np.ndarray]:
    out = [np.asarray(a, np.float32)]
    while max(out[-1].shape) > min_side:
        out.append(halve_ref(out[-1], how))
    return out


def all_window_ref(cond: np.ndarray, window: int) -> np.ndarray:
    u, s = cond.shape
    out = np.zeros((u, s), bool)
    for j in range(window - 1, s):
        if window >= 1:
            out[:, j] = cond[:, j - window + 1 : j + 1].all(axis=1)
    return out


# ---- traces -----------------------------------------------------------------------------------
def write_rows(path: Path, rows: list[tuple[int, str, str, str, np.ndarray | None]]) -> Path:
    """Vector rows (step, module, kind, phase, values) through the real writer, one batch each
    step group, in the order given."""
    lay = Layout()
    meta = {"layout": lay.to_dict(), "modules": [{"name": "m", "type": "ReLU", "depth": 1}]}
    with TraceWriter(path, meta, compression=None) as w:
        for i in range(0, len(rows), 3):
            part = rows[i : i + 3]
            vecs = [np.zeros(0, np.float32) if r[4] is None else r[4] for r in part]
            counts, moments = vector_state(vecs, lay, width=L.HEADER)
            empty = (pa.array([], pa.list_(pa.uint16())), pa.array([], pa.list_(pa.uint32())))
            batch = state_to_batch(
                counts,
                moments,
                lay,
                step=np.array([r[0] for r in part]),
                module=[r[1] for r in part],
                kind=[r[2] for r in part],
                tensor=[""] * len(part),
                dtype=["float32"] * len(part),
                shape=[(len(v),) for v in vecs],
                phase=[r[3] for r in part],
                values=[r[4] for r in part],
                hist=hist_with_empty(*empty, len(part)),
            )
            w.write(batch)
    return path


def ragged_rows(seed: int = 0) -> list[tuple[int, str, str, str, np.ndarray | None]]:
    """Steps with gaps, written out of order, a unit count that grows then shrinks, NaN and Inf
    cells, a null row, eval rows and another module's rows mixed in."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, str, str, str, np.ndarray | None]] = []
    steps = [s for s in range(0, 300, 2) if s % 14]  # gaps
    rng.shuffle(steps)
    for s in steps:
        n = 70 if s < 120 else 97 if s < 250 else 61  # the unit count changes
        mean = rng.normal(size=n).astype(np.float32)
        mean[rng.random(n) < 0.05] = np.nan
        if s == 40:
            mean[3] = np.inf
        firing = rng.random(n).astype(np.float32)
        firing[:9] = 0.0  # units 0..8 never fire
        firing[20:30] = np.where(s > 150, 0.0, firing[20:30])  # die at step 152
        firing[40] = np.nan
        sat = np.where(np.arange(n) % 5 == 0, 1.0, rng.random(n) * 0.9).astype(np.float32)
        rows += [
            (s, "m", "unit_mean", "train", mean if s != 60 else None),
            (s, "m", "unit_firing", "train", firing),
            (s, "m", "unit_saturated", "train", sat),
        ]
        if s % 10 == 0:
            rows.append((s, "m", "unit_mean", "eval", rng.normal(size=n).astype(np.float32)))
            rows.append((s, "other", "unit_mean", "train", rng.normal(size=5).astype(np.float32)))
    return rows


def pick(rows: list, kind: str) -> list[tuple[int, np.ndarray | None]]:
    return [(r[0], r[4]) for r in rows if r[1] == "m" and r[2] == kind and r[3] == "train"]


@pytest.fixture(scope="module")
def ragged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    rows = ragged_rows()
    return write_rows(tmp_path_factory.mktemp("ragged") / "r.arrow", rows), rows


@pytest.fixture(params=["memory", "disk"])
def data(request: pytest.FixtureRequest, ragged: tuple[Path, list], tmp_path: Path) -> UnitData:
    """Tiny blocks (many of them, odd sizes at the upper levels) and a small top level."""
    path, _ = ragged
    copy = tmp_path / "r.arrow"
    copy.write_bytes(path.read_bytes())
    return UnitData(
        load(copy), use_disk=request.param == "disk", min_cache_cells=0, chunk_cells=7 * 97
    )


# ---- matrices and pyramid ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["unit_mean", "unit_firing"])
def test_matrix_matches_in_memory_definition(data: UnitData, ragged: tuple, kind: str) -> None:
    steps, ref = matrix_ref(pick(ragged[1], kind))
    m = data.matrix("m", kind)
    np.testing.assert_array_equal(m.steps, steps)
    np.testing.assert_array_equal(m.values, ref)
    assert data.n_units("m", kind) == ref.shape[0] == 97
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(data.column_sums("m", kind), np.nansum(ref, 0), rtol=1e-5)


@pytest.mark.parametrize("how", ["mean", "max"])
def test_pyramid_levels_match_reference(data: UnitData, ragged: tuple, how: str) -> None:
    got = data.pyramid("m", "unit_mean", how).levels
    want = levels_ref(matrix_ref(pick(ragged[1], "unit_mean"))[1], how)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):  # float32 sums of 4 cells of size ~1: ~1e-7 apart
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, equal_nan=True)
    if data.use_disk:
        assert isinstance(data.pyramid("m", "unit_mean", how)._t[1], np.memmap)


def test_in_memory_pyramid_matches_reference() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(131, 517)).astype(np.float32)
    a[rng.random(a.shape) < 0.1] = np.nan
    for how in ("mean", "max"):
        got = Pyramid(a, how=how).levels
        for g, w in zip(got, levels_ref(a, how), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_window_matches_reference_cells(data: UnitData, ragged: tuple) -> None:
    _, ref = matrix_ref(pick(ragged[1], "unit_mean"))
    want = levels_ref(ref)
    p = data.pyramid("m", "unit_mean")
    for u0, u1, i0, i1, h, w in [
        (0, 97, 0, 300, 10, 10),
        (5.5, 40.2, 10.1, 80.7, 8, 12),
        (90, 97, 100, 107, 100, 100),  # zoomed past the cells: level 0
        (96.9, 97, 3, 3.5, 4, 4),  # under one cell: still two a side
    ]:
        a, (r0, r1, c0, c1) = p.window(u0, u1, i0, i1, h, w)
        du, di = min(u1, ref.shape[0]) - max(u0, 0), min(i1, ref.shape[1]) - max(i0, 0)
        lvl = 0  # the coarsest level with at least h x w cells over the window
        while lvl + 1 < len(want) and du / 2 ** (lvl + 1) >= h and di / 2 ** (lvl + 1) >= w:
            lvl += 1
        f = 2**lvl
        if lvl == 0:
            np.testing.assert_array_equal(a, ref[r0:r1, c0:c1])
        else:
            cells = want[lvl][r0 // f : r0 // f + a.shape[0], c0 // f : c0 // f + a.shape[1]]
            np.testing.assert_allclose(a, cells, rtol=1e-6, atol=1e-6)
        assert a.shape[0] >= 2 and a.shape[1] >= 2
        assert a.shape[0] <= max(4 * h, 64) and a.shape[1] <= max(4 * w, 64)  # 64: top level
        assert r0 <= max(u0, 0) + 1 and c0 <= i0 + 1 and a.dtype == np.float32


# ---- dead and saturated -----------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 3, 5, 40])
def test_dead_and_saturated_match_reference(data: UnitData, ragged: tuple, window: int) -> None:
    _, firing = matrix_ref(pick(ragged[1], "unit_firing"))
    _, sat = matrix_ref(pick(ragged[1], "unit_saturated"))
    dead = all_window_ref(firing == 0, window)
    satd = all_window_ref(sat >= 0.99, window)
    np.testing.assert_array_equal(data.dead("m", window).values, dead)
    np.testing.assert_array_equal(data.saturated("m", window).values, satd)
    np.testing.assert_array_equal(data._all_window(firing == 0, window), dead)
    df = data.dead_fractions(window)
    np.testing.assert_allclose(df.dead.to_numpy(), dead.mean(0))
    np.testing.assert_allclose(df.saturated.to_numpy(), satd.mean(0))
    assert data.dead_units("m", window) == np.flatnonzero(dead[:, -1]).tolist()
    steps, pyr = data.map_pyramid("m", "dead", window)
    for g, w in zip(pyr.levels, levels_ref(dead.astype(np.float32)), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, equal_nan=True)


def test_dead_units_of_the_ragged_trace(data: UnitData) -> None:
    assert data.dead_units("m", 5) == list(range(9)) + list(range(20, 30))
    assert data.dead("m", 0).values.sum() == 0


def test_all_window_never_builds_a_full_cumsum() -> None:
    cond = np.zeros((3, 10), bool)
    cond[1, 2:] = True
    d = UnitData.__new__(UnitData)
    d.chunk_cells = 4  # blocks of one step: the carry does all the work
    np.testing.assert_array_equal(d._all_window(cond, 4), all_window_ref(cond, 4))


# ---- cache ------------------------------------------------------------------------------------
def test_cache_is_reused_then_invalidated(tmp_path: Path) -> None:
    rows = ragged_rows(1)
    path = write_rows(tmp_path / "c.arrow", rows)
    a = UnitData(load(path), min_cache_cells=0)
    first = np.array(a.matrix("m", "unit_mean").values)
    a.dead_fractions()
    assert a.store.builds == 3  # mean, dead, saturated
    assert os.path.isdir(U.cache_dir(str(path)))
    b = UnitData(load(path), min_cache_cells=0)
    np.testing.assert_array_equal(b.matrix("m", "unit_mean").values, first)
    b.dead_fractions()
    assert b.store.builds == 0
    assert b._stat_entry("m", "unit_mean").location == U.cache_dir(str(path))

    rows[0] = (rows[0][0], "m", "unit_mean", "train", np.full(97, 7.0, np.float32))
    write_rows(path, rows)  # the trace changed: size or mtime differ
    c = UnitData(load(path), min_cache_cells=0)
    steps, ref = matrix_ref(pick(rows, "unit_mean"))
    np.testing.assert_array_equal(c.matrix("m", "unit_mean").values, ref)
    assert c.store.builds == 1
    leftovers = [n for n in os.listdir(U.cache_dir(str(path))) if n.startswith(".")]
    assert leftovers == []


def test_small_matrices_stay_in_memory(ragged: tuple) -> None:
    d = UnitData(load(ragged[0]))  # default threshold: 97 x 150 cells is far below it
    assert d._stat_entry("m", "unit_mean").location == "memory"


def test_unwritable_folder_falls_back_to_temp_then_memory(
    tmp_path: Path, ragged: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    # root ignores permission bits: a path under a file cannot be created by anyone
    monkeypatch.setattr(U, "cache_dir", lambda p: str(blocker / "x.units"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    d = UnitData(load(ragged[0]), min_cache_cells=0)
    e = d._stat_entry("m", "unit_mean")
    assert e.location == U._fallback_dir(ragged[0]) and e.location.startswith(str(tmp_path))
    again = UnitData(load(ragged[0]), min_cache_cells=0)
    again._stat_entry("m", "unit_mean")
    assert again.store.builds == 0  # reused from the temp folder

    monkeypatch.setattr(U, "_fallback_dir", lambda p: str(blocker / "y"))
    m = UnitData(load(ragged[0]), min_cache_cells=0)
    assert m._stat_entry("m", "unit_mean").location == "memory"
    np.testing.assert_array_equal(
        m.matrix("m", "unit_mean").values, matrix_ref(pick(ragged[1], "unit_mean"))[1]
    )


def test_full_disk_falls_back_to_memory(
    tmp_path: Path, ragged: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.arrow"
    path.write_bytes(Path(ragged[0]).read_bytes())

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(U.os, "posix_fallocate", full)
    monkeypatch.setattr(U, "_fallback_dir", lambda p: str(tmp_path / "fallback"))
    d = UnitData(load(path), min_cache_cells=0)
    assert d._stat_entry("m", "unit_mean").location == "memory"
    np.testing.assert_array_equal(
        d.matrix("m", "unit_mean").values, matrix_ref(pick(ragged[1], "unit_mean"))[1]
    )
    for folder in (U.cache_dir(str(path)), str(tmp_path / "fallback")):
        assert [n for n in os.listdir(folder) if n.startswith(".build")] == []


def test_empty_and_missing_rows(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "e.arrow", [(0, "m", "unit_mean", "train", None)])
    d = UnitData(load(path), min_cache_cells=0)
    assert d.matrix("m", "unit_mean").values.shape == (0, 1)
    assert d.matrix("m", "unit_firing").values.shape == (0, 0)
    assert d.dead_units("m") == [] and d.modules("unit_mean") == ["m"]


# ---- synthetic trace and bench ----------------------------------------------------------------
def test_synthetic_units_trace_has_dead_structure(tmp_path: Path) -> None:
    spec = UnitsSpec(units=400, steps=60, scatter_dead=0.0, cells_per_batch=400 * 7)
    info = write_synthetic_units(tmp_path / "s.arrow", spec)
    assert info["rows"] == 120 and units_spec(1e9).units == 100_000
    assert units_spec(1e9).steps == 10_000
    d = UnitData.open(str(tmp_path / "s.arrow"), min_cache_cells=0)
    assert d.modules("unit_firing") == ["hidden_act"]
    dead = np.asarray(d.dead("hidden_act").values)
    band = slice(120, 128)  # dead from the start, alive again at step 30
    assert dead[band, 4:30].all() and not dead[band, 30:].any()
    wedge = dead[240:300].argmax(axis=1)  # the block dying unit by unit
    assert (np.diff(wedge) >= 0).all() and wedge[0] < wedge[-1]
    assert not dead[:120].any()


def test_bench_quick_runs(tmp_path: Path) -> None:
    paths = [str(ROOT / "python"), str(ROOT / "viewer")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_viewer_units.py"),
            "--quick",
            "--no-browser",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "re-render unit_mean 1024x" in out.stdout and "cache build" in out.stdout
    assert os.listdir(tmp_path) == []  # the trace and its cache are removed
