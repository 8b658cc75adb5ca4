"""``python -m dnntrace.demo`` end to end, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dnntrace

KINDS = {"activation", "activation_grad", "weight", "weight_grad"}


def test_demo_writes_two_loadable_traces(tmp_path: Path) -> None:
    out = tmp_path / "demo.arrow"
    r = subprocess.run(
        [sys.executable, "-m", "dnntrace.demo", "--steps", "5", "--mlp-steps", "5",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for path in (out, tmp_path / "demo-mlp.arrow"):
        trace = dnntrace.load(path)
        # tensor rows: one per training step. (The MLP also records spectra computed in the
        # background, whose results may land in one more flush at close, FORMAT.md.)
        tensor_steps = set()
        for kind in KINDS:
            tensor_steps |= set(trace.select(kind=kind).column("step").to_pylist())
        assert sorted(tensor_steps) == [0, 1, 2, 3, 4], path
        assert KINDS <= set(trace.kinds), (path, trace.kinds)
        scalars = trace.select(kind="scalar", tensor="loss")
        assert scalars.num_rows == 5, path
        assert not trace.truncated
    assert "5 steps written, 0 dropped" in r.stdout


def test_demo_bad_argument(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dnntrace.demo", "--steps", "0", "--out", str(tmp_path / "d.arrow")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["dnntrace.demo: --steps must be >= 1"]
    assert not (tmp_path / "d.arrow").exists()
