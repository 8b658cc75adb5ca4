"""File names of a run, in one place: trace files, the rank files of a distributed run, and the
sidecar files and caches that live next to a trace.

- a trace is ``<name>.arrow`` (``TRACE_SUFFIX``);
- under ``torch.distributed`` with ``world_size > 1`` the path ``run.arrow`` becomes the folder
  ``run/`` holding ``rank0.arrow``, ``rank1.arrow``, ... (``rank_path``) and the cross-rank merge
  ``merged.arrow`` (``MERGED_FILE``); a path with ``{rank}`` in it is formatted instead;
- sidecars are named by appending a suffix to the trace's path (``sidecar``): the viewer's LOD
  cache ``<trace>.lod/``, its per-unit cache ``<trace>.units/``, the PCA directions of the
  trajectory ``<trace>.pca.pt``; a loss landscape computed for a trace is ``<stem>-landscape.arrow``
  (``landscape_path``). Folders and files starting with ``.`` are never traces.

Imports nothing but the standard library.
"""

from __future__ import annotations

import os
import re

TRACE_SUFFIX = ".arrow"
MERGED_FILE = "merged" + TRACE_SUFFIX
MERGED_RANK = -1  # the rank column of merged rows
RANK_FILE = re.compile(r"^(rank\d+|merged)\.arrow$")  # a rank folder's files

# sidecar name -> suffix appended to the trace's path
SIDECARS = {
    "lod": ".lod",  # dnntrace_viewer.lod: per-(module, kind) level-of-detail tables
    "units": ".units",  # dnntrace_viewer.units_data: per-unit pyramids
    "pca": ".pca.pt",  # capture.spectral.Trajectory: PCA directions of the snapshots
}
LANDSCAPE_SUFFIX = "-landscape" + TRACE_SUFFIX


def rank_file_name(rank: int, suffix: str = TRACE_SUFFIX) -> str:
    """``rank<rank>.arrow``: the file of one rank inside a run's folder."""
    return f"rank{rank}{suffix}"


def rank_path(path: str | os.PathLike[str], rank: int, world_size: int) -> str:
    """The file of ``rank``: ``path`` formatted when it holds ``{rank}``; else, when
    ``world_size > 1``, ``<path without suffix>/rank<rank>.arrow``; else ``path`` itself."""
    p = os.fspath(path)
    if "{rank" in p or "{world_size" in p:
        return p.format(rank=rank, world_size=world_size)
    if world_size <= 1:
        return p
    stem, ext = os.path.splitext(p)
    return os.path.join(stem, rank_file_name(rank, ext or TRACE_SUFFIX))


def merged_path(rank_file: str | os.PathLike[str]) -> str:
    """``merged.arrow`` beside a rank file."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(rank_file))), MERGED_FILE)


def is_rank_file(name: str) -> bool:
    """True for the base name of a rank file or of ``merged.arrow``."""
    return RANK_FILE.match(os.path.basename(name)) is not None


def is_trace_file(name: str) -> bool:
    """True for a ``.arrow`` file name that is not hidden (temporary files start with ``.``)."""
    base = os.path.basename(name)
    return base.endswith(TRACE_SUFFIX) and not base.startswith(".")


def sidecar(path: str | os.PathLike[str], which: str) -> str:
    """The path of sidecar ``which`` (``lod``, ``units``, ``pca``) of the trace at ``path``."""
    try:
        return os.fspath(path) + SIDECARS[which]
    except KeyError:
        raise ValueError(f"unknown sidecar {which!r}; one of {', '.join(SIDECARS)}") from None


def landscape_path(path: str | os.PathLike[str]) -> str:
    """``<stem>-landscape.arrow``: where a loss landscape of the trace at ``path`` is looked for."""
    return os.path.splitext(os.fspath(path))[0] + LANDSCAPE_SUFFIX


__all__ = [
    "LANDSCAPE_SUFFIX",
    "MERGED_FILE",
    "MERGED_RANK",
    "RANK_FILE",
    "SIDECARS",
    "TRACE_SUFFIX",
    "is_rank_file",
    "is_trace_file",
    "landscape_path",
    "merged_path",
    "rank_file_name",
    "rank_path",
    "sidecar",
]
