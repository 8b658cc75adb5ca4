"""``dnntrace info``: a good trace, and bad files that give one line on stderr and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dnntrace


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("dnntrace")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "dnntrace.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def good_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "good.arrow"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with dnntrace.enable(model, path) as tr:
        for _ in range(4):
            loss = model(torch.randn(3, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            tr.log_scalar("loss", loss)
            opt.step()
    return path


def test_info_good_trace(good_trace: Path) -> None:
    r = _cli("info", str(good_trace))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = r.stdout
    assert "4 (0..3)" in out
    assert "Linear" in out and "ReLU" in out
    assert "anomalies  none" in out
    j = _cli("info", "--json", str(good_trace))
    report = json.loads(j.stdout)
    assert report["steps"] == 4 and report["modules"] == ["", "0", "1", "2"]  # call order
    assert set(report["kinds"]) >= {"activation", "weight", "weight_grad", "scalar"}
    assert report["truncated"] is False


def _assert_one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert needle in lines[0], lines[0]
    assert r.stdout == ""


def test_info_bad_files(tmp_path: Path, good_trace: Path) -> None:
    _assert_one_line_error(_cli("info", str(tmp_path / "missing.arrow")), "no such file")
    empty = tmp_path / "empty.arrow"
    empty.write_bytes(b"")
    _assert_one_line_error(_cli("info", str(empty)), "empty")
    junk = tmp_path / "junk.arrow"
    junk.write_bytes(os.urandom(4096))
    _assert_one_line_error(_cli("info", str(junk)), "junk.arrow")
    _assert_one_line_error(_cli("info", str(tmp_path)), "folder")
    data = good_trace.read_bytes()
    head = tmp_path / "head.arrow"  # cut inside the schema message
    head.write_bytes(data[:100])
    _assert_one_line_error(_cli("info", str(head)), "head.arrow")


def test_info_trace_cut_mid_batch(tmp_path: Path, good_trace: Path) -> None:
    data = good_trace.read_bytes()
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(data[: len(data) - 300])  # the last batch torn
    r = _cli("info", str(cut))
    assert r.returncode == 0, r.stderr
    assert "truncated" in r.stdout
    assert dnntrace.load(cut).truncated


def test_bad_arguments() -> None:
    r = _cli("info")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = _cli("frobnicate", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
