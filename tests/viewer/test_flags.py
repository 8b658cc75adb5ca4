"""Flags and counts from one definition (``dnntrace.storage.kinds``): ``dnntrace info``, the
viewer's overview and its Anomalies tab agree; a derived row (a spectrum's NaN power-law fit)
never raises a model flag; a NaN in a tensor row always does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _traces import rewrite, vector_rows

from dnntrace.cli import main as dnntrace_main
from dnntrace.storage import kinds
from dnntrace_viewer.data_store import Run
from dnntrace_viewer.units_data import UnitData

NAN = math.nan


def _info(path: str, capsys: pytest.CaptureFixture[str]) -> dict:
    assert dnntrace_main(["info", path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _with_nan_spectra(src: str, dst: Path) -> str:
    # an esd row whose fit failed (alpha = NaN, KS = NaN), a spectrum with an Inf, a per-unit row
    # with NaN: all derived, none a tensor of the model
    extra = vector_rows(
        src,
        [
            (3, "fc0", "esd", "weight", [3, NAN, NAN, 0.1, 0, 16]),
            (3, "fc0", "spectrum", "weight", [math.inf, 1.0, 0.5]),
            (4, "act1", "unit_mean", "", [NAN] * 16),
            (5, "fc1", "update_ratio", "weight", [NAN]),
        ],
    )
    return rewrite(src, dst, extra=[extra])


def test_registry_partitions_the_kinds() -> None:
    assert set(kinds.TENSOR_KINDS).isdisjoint(kinds.DERIVED_KINDS)
    assert all(kinds.is_tensor_kind(k) for k in kinds.TENSOR_KINDS)
    assert not any(kinds.is_tensor_kind(k) for k in (*kinds.DERIVED_KINDS, "scalar", "new_kind"))
    assert kinds.family("esd") == "spectral" and kinds.family("unit_max") == "unit"
    assert kinds.family("some_future_kind") == "other"


def test_derived_nan_rows_raise_no_flag(
    clean_trace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _with_nan_spectra(clean_trace, tmp_path / "clean-esd.arrow")
    # the rows are there, with their NaNs counted
    esd = Run.open(path, use_cache=False).trace.select(kind="esd")
    assert esd.num_rows == 1 and esd.column("nan_count")[0].as_py() == 2
    info = _info(path, capsys)
    assert info["anomalies"] == []
    run = Run.open(path, use_cache=False)
    health = run.health()
    assert not health["flags"].str.contains("nan").any(), health[["module", "flags"]]
    assert health["first_nan_step"].isna().all()
    assert run.first_nonfinite() is None
    units = UnitData.open(run.trace)
    assert units.anomalies().empty
    assert int(units.nonfinite_timeline()["bad_values"].sum()) == 0


def test_tensor_nan_flags_everywhere(
    demo_trace: str, spec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _with_nan_spectra(demo_trace, tmp_path / "nan-esd.arrow")
    info = _info(path, capsys)
    first = min(a["step"] for a in info["anomalies"])
    assert first == spec.nan_step
    bad_mods = {a["module"] for a in info["anomalies"]}
    run = Run.open(path, use_cache=False)
    health = run.health().set_index("path")
    flagged = {m for m, f in health["flags"].items() if "nan" in f.split()}
    # the modules of the NaN layer (fc<l>, act<l>), and fc0 (esd NaN) is not among them
    assert flagged == {f"fc{spec.nan_layer}", f"act{spec.nan_layer}"}
    assert bad_mods <= flagged and "fc0" not in flagged
    assert int(health.loc[f"fc{spec.nan_layer}", "first_nan_step"]) == spec.nan_step
    assert run.first_nonfinite()["step"] == spec.nan_step
    tl = UnitData.open(run.trace).nonfinite_timeline()
    bad_steps = set(tl.loc[tl["bad_values"] > 0, "step"])
    assert min(bad_steps) == spec.nan_step and 3 not in bad_steps and 4 not in bad_steps
    an = UnitData.open(run.trace).anomalies()
    assert int(an["step"].min()) == spec.nan_step
