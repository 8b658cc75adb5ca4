"""Trace files named on the command line. Imports no Panel: the CLI resolves and loads the files
while Panel imports in another thread."""

from __future__ import annotations

import os
from collections.abc import Sequence

from dnntrace.storage import TraceError
from dnntrace.storage.files import is_trace_file


def find_traces(paths: Sequence[str]) -> list[str]:
    """Trace files named on the command line; a folder stands for its ``*.arrow`` files."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if is_trace_file(f))
            if not found:
                raise TraceError(f"{p}: folder holds no .arrow trace files")
            out += found
        else:
            out.append(p)
    return out


__all__ = ["find_traces"]
