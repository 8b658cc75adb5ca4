"""dnntrace-view on bad input (one line, exit 2), security checks, exports."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import imageio.v2 as iio
import pytest

from dnntrace.storage import TraceWriter
from dnntrace_viewer.cli import main

ENV = {**os.environ}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dnntrace_viewer", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def one_line_error(p: subprocess.CompletedProcess[str], needle: str) -> None:
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("dnntrace-view: error:") and needle in lines[0]
    assert "Traceback" not in p.stderr


def test_missing_file(tmp_path) -> None:
    one_line_error(run_cli(str(tmp_path / "nope.arrow"), "--no-browser"), "no such file")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "empty file"),
        (b"PK\x03\x04 definitely not arrow" * 10, "not an Arrow IPC stream"),
    ],
)
def test_bad_files(tmp_path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.arrow"
    path.write_bytes(content)
    assert main([str(path), "--no-browser"]) == 2


def test_bad_files_subprocess(tmp_path) -> None:
    path = tmp_path / "bad.arrow"
    path.write_bytes(b"garbage" * 50)
    one_line_error(run_cli(str(path)), "not an Arrow IPC stream")


def test_unknown_schema_version(tmp_path, capsys) -> None:
    path = tmp_path / "v99.arrow"
    TraceWriter(path, {"schema_version": 99}).close()
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown trace schema version 99" in err and "\n" not in err


def test_non_loopback_host_needs_auth(demo_trace: str, capsys) -> None:
    assert main([demo_trace, "--host", "0.0.0.0"]) == 2
    assert "--basic-auth" in capsys.readouterr().err


def test_unknown_module(demo_trace: str, capsys) -> None:
    assert main([demo_trace, "--module", "nope", "--export", "x.png"]) == 2
    assert "no module 'nope'" in capsys.readouterr().err


def test_truncated_trace_exports(tmp_path, demo_trace: str) -> None:
    with open(demo_trace, "rb") as f:
        data = f.read()
    path = tmp_path / "torn.arrow"
    path.write_bytes(data[: len(data) * 2 // 3])  # cut inside a batch
    out = tmp_path / "torn.png"
    assert main([str(path), "--export", str(out)]) == 0
    assert out.stat().st_size > 1000


# imageio-ffmpeg 0.8.1 leaves the ffmpeg subprocess pipes to the garbage collector
# (ResourceWarning "unclosed file" surfacing as PytestUnraisableExceptionWarning)
FFMPEG_PIPES = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.parametrize("ext", ["png", "gif", pytest.param("mp4", marks=FFMPEG_PIPES), "html"])
def test_exports(tmp_path, demo_trace: str, ext: str) -> None:
    out = tmp_path / f"out.{ext}"
    assert main([demo_trace, "--export", str(out), "--no-cache"]) == 0
    assert out.stat().st_size > 1000
    if ext == "png":
        img = iio.imread(out)
        assert img.ndim == 3 and len({tuple(p) for p in img.reshape(-1, 3)[::7]}) > 20
    elif ext in ("gif", "mp4"):
        with iio.get_reader(out) as reader:
            frames = [f for f in reader]  # noqa: C416 - list() asks len(): inf for ffmpeg
        assert len(frames) >= 10
        assert (frames[0] != frames[-1]).any()  # the animation moves
    else:
        html = out.read_text()
        assert "demo.arrow" in html
        # offline: no script or stylesheet fetched from the network
        assert not re.search(r"<script[^>]+src=[\"']https?:", html)
        assert not re.search(r"<link[^>]+href=[\"']https?:", html)


def test_bad_export_extension(tmp_path, demo_trace: str) -> None:
    assert main([demo_trace, "--export", str(tmp_path / "x.pdf")]) == 2
