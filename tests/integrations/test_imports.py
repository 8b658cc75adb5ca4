"""Importing dnntrace (and dnntrace.integrations) imports neither Lightning nor transformers."""

from __future__ import annotations

import subprocess
import sys


def test_integrations_import_no_trainer_library() -> None:
    code = (
        "import sys, dnntrace, dnntrace.integrations, dnntrace.capture\n"
        "libs = ('lightning', 'pytorch_lightning', 'transformers', 'accelerate')\n"
        "bad = [m for m in libs if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    rc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr


def test_resume_path_never_reuses_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dnntrace.integrations import resume_path

    p = tmp_path / "t.arrow"
    assert resume_path(p, 0) == str(p) == resume_path(p, 7)  # nothing there yet
    p.write_bytes(b"x")
    assert resume_path(p, 0) == str(p)  # a fresh run (step 0) writes the path itself
    assert resume_path(p, 7) == str(tmp_path / "t.from7.arrow")
    (tmp_path / "t.from7.arrow").write_bytes(b"x")
    assert resume_path(p, 7) == str(tmp_path / "t.from7-2.arrow")
