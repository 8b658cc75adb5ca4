"""Caches of derived tables kept beside a trace: the LOD tables (``<trace>.lod/``) and the
per-unit pyramids (``<trace>.units/``), one helper for both.

A cache is a folder of entries. Its ``signature.json`` names the trace it belongs to (size,
modification time, the cache's format version and anything else the owner adds); an entry of
another signature is never read, and a folder of another signature is emptied before the first
new entry goes in. An entry is written into a temporary folder and renamed into place, so a
reader sees a whole entry or none, and two processes building the same entry both succeed (the
second keeps the first's). Places are tried in order: beside the trace, then a folder of the
temp directory (a read-only or full trace folder), then none (the owner keeps the tables in
memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any


def in_temp(path: str | os.PathLike[str], name: str) -> str:
    """The fallback folder for a trace whose own folder is not writable."""
    h = hashlib.sha1(os.path.abspath(os.fspath(path)).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), name, h)


class Sidecar:
    """The cache folders (``dirs``, in order of preference) of the trace at ``path``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        dirs: Sequence[str],
        version: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.dirs = list(dirs)
        self.version = version
        self.extra = dict(extra or {})
        self._ready: dict[str, bool] = {}

    def signature(self) -> dict[str, Any]:
        st = os.stat(self.path)
        return {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            **self.extra,
            "version": self.version,
        }

    def valid(self, d: str) -> bool:
        """Whether folder ``d`` holds entries of the trace as it is now."""
        try:
            with open(os.path.join(d, "signature.json")) as f:
                return bool(json.load(f) == self.signature())
        except (OSError, ValueError):
            return False

    def prepare(self, d: str) -> bool:
        """Folder ``d`` exists, is writable and holds only entries of the trace as it is now
        (emptied first when it held another's); False when it cannot be."""
        if d in self._ready:
            return self._ready[d]
        try:
            if not self.valid(d):
                if os.path.isdir(d):
                    shutil.rmtree(d)
                os.makedirs(d, exist_ok=True)
                tmp = os.path.join(d, ".signature.json.tmp")
                with open(tmp, "w") as f:
                    json.dump(self.signature(), f)
                os.replace(tmp, os.path.join(d, "signature.json"))
            probe = tempfile.mkdtemp(prefix=".probe-", dir=d)
            os.rmdir(probe)
            ok = True
        except OSError:
            ok = False
        self._ready[d] = ok
        return ok

    def mark_unusable(self, d: str) -> None:
        """A write in ``d`` failed (full, read-only): the next build tries the next place."""
        self._ready[d] = False

    def find(self, name: str) -> str | None:
        """The folder of entry ``name`` in the first valid place that has it, else None."""
        for d in self.dirs:
            e = os.path.join(d, name)
            if self.valid(d) and os.path.isdir(e):
                return e
        return None

    def write(self, name: str, fill: Callable[[str], None]) -> str | None:
        """Writes entry ``name`` through ``fill(folder)`` into the first usable place, whole or
        not at all; returns the entry's folder, or None when no place could take it."""
        for d in self.dirs:
            if not self.prepare(d):
                continue
            tmp: str | None = None
            try:
                tmp = tempfile.mkdtemp(prefix=".build-", dir=d)
                fill(tmp)
                final = os.path.join(d, name)
                try:
                    os.rename(tmp, final)
                    tmp = None
                except OSError:  # another process wrote it first: theirs is as good
                    pass
                return final
            except OSError:
                self.mark_unusable(d)
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
        return None


__all__ = ["Sidecar", "in_temp"]
