"""The one cache helper of the LOD tables and the per-unit pyramids: entries whole or absent,
tied to the trace's signature, beside the trace else in the temp folder else nowhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from dnntrace.storage import load
from dnntrace_viewer import lod as LD
from dnntrace_viewer.sidecar import Sidecar


def _trace(tmp_path: Path, demo_trace: str) -> Path:
    path = tmp_path / "t.arrow"
    path.write_bytes(Path(demo_trace).read_bytes())
    return path


def test_entry_written_whole_and_tied_to_the_trace(tmp_path: Path, demo_trace: str) -> None:
    path = _trace(tmp_path, demo_trace)
    sc = Sidecar(path, [str(tmp_path / "c")], version=1)
    assert sc.find("e") is None

    def fill(d: str) -> None:
        (Path(d) / "x.txt").write_text("ok")

    final = sc.write("e", fill)
    assert final is not None and (Path(final) / "x.txt").read_text() == "ok"
    assert sc.find("e") == final
    assert not [n for n in os.listdir(tmp_path / "c") if n.startswith(".")]  # no leftovers

    def broken(d: str) -> None:
        (Path(d) / "half.txt").write_text("x")
        raise OSError("disk full")

    assert sc.write("f", broken) is None and sc.find("f") is None  # nothing half-written
    assert Sidecar(path, [str(tmp_path / "c")], version=2).find("e") is None  # other format
    os.utime(path, ns=(1, 1))
    assert Sidecar(path, [str(tmp_path / "c")], version=1).find("e") is None  # other file


def test_lod_cache_falls_back_to_temp_when_the_folder_is_not_writable(
    tmp_path: Path, demo_trace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _trace(tmp_path, demo_trace)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    # root ignores permission bits: a path under a file cannot be created by anyone
    monkeypatch.setattr(LD, "cache_dir", lambda p: str(blocker / "x.lod"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    lods, cached = LD.open_lods(load(path))
    assert not cached
    again, cached = LD.open_lods(load(path))
    assert cached  # from the temp folder
    key = ("act2", "activation")
    np.testing.assert_array_equal(np.asarray(again[key].sat), lods[key].sat)
    assert os.listdir(tmp_path / "tmp" / "dnntrace-lod")
