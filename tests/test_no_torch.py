"""The layers below capture stay torch-free: ``dnntrace.sketch``, ``dnntrace.storage`` and the
viewer (``dnntrace_viewer`` and every module in it) import in a process where torch cannot be
imported at all, and none of them even tries (a lazy ``import torch`` inside a try would pass
the ``sys.modules`` check but still load torch on a machine that has it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Runs in a fresh interpreter: a meta-path finder, installed before anything of dnntrace is
# imported, refuses torch (and the native extension, which links it) and records each attempt.
_BLOCK = """
import importlib, json, pkgutil, sys

attempts = []

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "dnntrace._C":
            attempts.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, NoTorch())
imported = []
for pkg in json.loads(sys.argv[1]):
    mod = importlib.import_module(pkg)
    imported.append(pkg)
    for info in pkgutil.walk_packages(getattr(mod, "__path__", []), pkg + "."):
        if info.name.endswith(".__main__"):  # runs the CLI when imported
            continue
        importlib.import_module(info.name)
        imported.append(info.name)
blocked_works = False
try:
    import torch  # noqa: F401
except ImportError:
    blocked_works = True
print(json.dumps({"attempts": attempts[:-1], "imported": imported,
                  "blocked_works": blocked_works,
                  "torch_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
"""


def _import_without_torch(packages: list[str]) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCK, json.dumps(packages)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize(
    "packages",
    [
        ["dnntrace.sketch"],
        ["dnntrace.storage"],
        ["dnntrace.sketch", "dnntrace.storage", "dnntrace_viewer"],
    ],
    ids=["sketch", "storage", "viewer"],
)
def test_imports_without_torch(packages: list[str]) -> None:
    out = _import_without_torch(packages)
    assert out["blocked_works"], "the finder did not block torch: the test would prove nothing"
    assert out["attempts"] == [], f"tried to import {out['attempts']}"
    assert out["torch_loaded"] == []
    imported = out["imported"]
    assert isinstance(imported, list)
    assert set(packages) <= set(imported)
    if "dnntrace_viewer" in packages:  # the data modules are among those walked
        for mod in ("data_store", "lod", "units_data", "spectral_data", "ranks_data", "app"):
            assert f"dnntrace_viewer.{mod}" in imported


def test_the_blocker_catches_a_torch_import() -> None:
    """The same harness fails on a module that imports torch (here ``dnntrace.ops``)."""
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCK, json.dumps(["dnntrace.ops"])],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr
